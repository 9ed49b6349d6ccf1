"""Moved a floor down to `dreamrelation_core.fp8` (Mochi and Wan both load scaled fp8 files).
This old name is the same module object, so existing imports (and patches in tests) keep working."""

import sys

from .. import fp8 as _fp8

sys.modules[__name__] = _fp8
