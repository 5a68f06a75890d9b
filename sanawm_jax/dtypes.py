"""The numerics policy shared by every model config: parameter storage and compute dtypes, named by strings."""

import jax.numpy as jnp

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}


class DtypePolicy:
    """Mixin for frozen config dataclasses with `param_dtype` and `dtype` fields holding keys of DTYPES."""

    def dtype_checks(self) -> list[tuple[bool, str]]:
        return [
            (self.param_dtype in DTYPES, f"param_dtype must be one of {sorted(DTYPES)}"),
            (self.dtype in DTYPES, f"dtype must be one of {sorted(DTYPES)}"),
        ]

    @property
    def compute_dtype(self):
        return DTYPES[self.dtype]

    @property
    def parameter_dtype(self):
        return DTYPES[self.param_dtype]
