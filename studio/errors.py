"""Every error the engine raises on purpose, in one tree.

    StudioError                    base: one clear line for the user (str(err))
    ├── InputError                 the user's input is wrong; nothing was changed
    │   ├── SettingsError          an impossible setting ("`steps` must be 1-200, got 0")
    │   ├── ModelLoadError         a model path/file that cannot be loaded (pickle, missing, wrong layout)
    │   └── LoraError              a LoRA file that cannot be applied (format, base model, shapes, NaN)
    ├── ResourceError              the machine ran out of something
    │   └── OutOfMemory            RAM/VRAM exhausted; what could be freed was freed
    ├── Cancelled                  the user stopped the job; partial work was discarded
    └── EngineFault                the engine caught its own state going wrong (a bug it detected)
        └── PristineCorrupted      a weight was written at rest, into its pristine copy: reload the model

The UI turns these into `gr.Error` in exactly one place (ui/errors.py): a refusal logs one
line, an EngineFault its traceback too; the CLI prints `str(err)` on stderr and exits
non-zero. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class StudioError(Exception):
    """Base of every deliberate engine error; its message is meant for the user."""


class InputError(StudioError):
    """Bad input; raised before any weight was touched (or after restoring them)."""


class SettingsError(InputError):
    """A setting or request field with an impossible value."""


class ModelLoadError(InputError):
    """A base model that cannot be loaded."""


class LoraError(InputError):
    """A LoRA file that cannot be read or applied."""


class ResourceError(StudioError):
    """The machine ran out of a resource."""


class OutOfMemory(ResourceError):
    """RAM or VRAM exhausted during a job."""


class Cancelled(StudioError):
    """The job was stopped by the user."""


class EngineFault(StudioError):
    """The engine noticed a broken invariant of its own (a bug); the message says how to recover."""


class PristineCorrupted(EngineFault):
    """Weights were written while pointing at the pristine copy (a bug: write only under a lock)."""
