"""The shipped demo LoRAs' A1111 short hashes, in one place (checked against the files in tests/lora/test_demo_loras.py).

A change here means the files changed (scripts/train_demo_loras.py was rerun): PNG infotext written
with the old files no longer points at them.
"""

DEMO_SHORT_HASHES = {
    "demo-kohya-warm": "6a0550917508",
    "demo-peft-cool": "b34f38823428",
    "demo-locon-grain": "6313da4c956e",
}
