"""fastarch's kernels as PyTorch operators: ``torch.ops.fastarch.<name>``.

Every kernel family is a ``torch.library.custom_op`` in the ``fastarch`` namespace with a fake
(shape) function; the differentiable ones carry their autograd formula, whose backward runs
our backward kernels as further ops. Operators, rather than Python autograd Functions, are
what the rest of PyTorch understands: ``torch.compile(fullgraph=True)`` traces a model
through them without a graph break (each op stays opaque; at run time it launches our Triton
kernel, compiled or interpreted), autocast passes them through untouched (``functional``
casts the arguments as torch would), and the profiler names each one ``fastarch::<name>``.
Each backward formula runs inside the range ``fastarch::<name>.backward`` (``profiling``).
One module per family (``fastarch.ops.conv2d``, ...) holds its operators, their shape and
autograd functions, output allocation and config choice; ``common`` what they share.

Operator schemas carry tensors, numbers, booleans and int lists only, so window geometry is
passed as int lists and a memory format as ``channels_last``; an output that was not asked
for is a 0-element placeholder (``absent``). Ops that write into an argument (running
statistics, in-place ReLU and dropout) are mutable and have no autograd formula: the
functional API calls them where no gradient flows through the written tensor, and otherwise
the out-of-place op, copying its output into the tensor (``ops.common.elementwise``).
"""
# Importing each family's host module registers its operators.
from fastarch.ops import avg_pool, batch_norm, conv2d, dropout, linear, max_pool  # noqa: F401
from fastarch.ops import batch_norm_conv2d, conv2d_chain, relu, sync_batch_norm  # noqa: F401
from fastarch.ops import batch_norm_linear  # noqa: F401
