"""Names of the device-mesh axes. Any of them may have size 1.

data:    data parallelism (batch split, parameters replicated)
fsdp:    fully sharded data parallelism (batch split, parameters and optimiser state split)
context: context parallelism (the frames of one sample split)
tensor:  tensor parallelism (attention heads and MLP hidden channels split)
"""

DATA, FSDP, CONTEXT, TENSOR = "data", "fsdp", "context", "tensor"
MESH_AXES = (DATA, FSDP, CONTEXT, TENSOR)
