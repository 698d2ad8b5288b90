"""LoRA files and how they are applied: base (patch interface), cache, patcher, sidecar.

Import from the submodules; nothing is re-exported here, so importing a reader does not pull
in torch-heavy engine code and vice versa.
"""
