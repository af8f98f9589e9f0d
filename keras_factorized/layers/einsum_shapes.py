"""How an einsum kernel splits into the two factors of `LowRankEinsumDense`.

Knows nothing of layers: equation parsing, the shapes `EinsumDense` gives
its kernel, bias and output (computed here rather than through Keras's
private helper, whose return value changed between Keras 3.10 and 3.15),
and the reshapes between the multi-axis kernel and its `m x n` matrix.
"""

from __future__ import annotations

import math
import re
import string

import numpy as np

from keras_factorized.validation import invalid_value as _invalid

_FORMS = (
    # (pattern on the equation with "..." written "0", which side is elided)
    (r"([a-zA-Z]+),([a-zA-Z]+)->([a-zA-Z]+)", None),
    (r"0([a-zA-Z]+),([a-zA-Z]+)->0([a-zA-Z]+)", "left"),
    (r"([a-zA-Z]{2,})0,([a-zA-Z]+)->([a-zA-Z]+)0", "right"),
)


def einsum_shapes(equation, bias_axes, input_shape, output_shape):
    """The kernel, bias and full output shapes of an `EinsumDense`.

    The same rules as `keras.layers.EinsumDense.build` (Keras 3.10-3.15):
    `output_shape` omits the batch axis and the axes under `...`.

    Args:
        equation: e.g. `"abc,cde->abde"` or `"...b,bc->...c"`.
        bias_axes: output axes with a bias, or `None`.
        input_shape: the input shape, batch axis included.
        output_shape: the partial output shape, as given to `EinsumDense`.

    Returns:
        `(kernel_shape, bias_shape or None, full_output_shape)`, as lists.

    Example:

    >>> einsum_shapes("abc,cde->abde", "de", (None, 5, 16), (None, 4, 8))
    ([16, 4, 8], [4, 8], [None, None, 4, 8])
    """
    compact = equation.replace("...", "0")
    for pattern, elided_side in _FORMS:
        match = re.fullmatch(pattern, compact)
        if match:
            return _split_shapes(match.groups(), bias_axes, list(input_shape),
                                 output_shape, elided_side)
    raise _invalid("equation", "an einsum string of the form 'ab,bc->ac', "
                   "'...ab,bc->...ac' or 'ab...,bc->ac...'", equation)


def _split_shapes(specs, bias_axes, input_shape, output_shape, elided_side):
    input_spec, weight_spec, output_spec = specs
    left = elided_side == "left"
    elided = len(input_shape) - len(input_spec)
    output = [output_shape] if isinstance(output_shape, int) else list(output_shape)
    output.insert(0, input_shape[0])
    if elided > 0 and left:
        for i in range(1, elided):
            output.insert(1, input_shape[i])
    elif elided > 0:
        output.extend(input_shape[len(input_shape) - elided:])
    if left:
        in_axis = {c: i + elided - len(input_shape) for i, c in enumerate(input_spec)}
        out_axis = {c: i + elided - len(output) for i, c in enumerate(output_spec)}
    else:
        in_axis = {c: i for i, c in enumerate(input_spec)}
        out_axis = {c: i for i, c in enumerate(output_spec)}
    for c in output_spec:
        if c not in input_spec and c not in weight_spec:
            raise _invalid("equation", f"output axes that come from the input or the "
                           f"kernel (axis {c!r} comes from neither)", "".join(specs))
    kernel = []
    for c in weight_spec:
        if c in in_axis:
            kernel.append(input_shape[in_axis[c]])
        elif c in out_axis:
            kernel.append(output[out_axis[c]])
        else:
            raise _invalid("equation", f"kernel axes found in the input or the output "
                           f"(axis {c!r} is in neither)", "".join(specs))
    bias = None
    if bias_axes is not None:
        sizes = {c: output[out_axis[c]] for c in output_spec}
        first = min(output_spec.find(c) for c in bias_axes)
        bias = [sizes[c] if c in bias_axes else 1 for c in output_spec[first:]]
        if not left:
            bias.extend([1] * max(elided, 0))
    return kernel, bias, output


class EinsumFactorization:
    """How an einsum kernel splits into contracted and output axes.

    For `equation = "abc,cde->abde"` the kernel axis `c` is contracted with the
    input and `d, e` are output axes, so the kernel is the matrix
    `c x (d*e)`. The low-rank layer computes `x -> einsum(x, A) -> einsum(., B)`
    with `A` of shape `(c, k)` and `B` of shape `(k, d, e)`.
    """

    def __init__(self, equation: str):
        if not isinstance(equation, str):
            raise _invalid("equation", "an einsum string such as 'abc,cde->abde'",
                           equation)
        compact = equation.replace(" ", "")
        # "..." becomes "0", as `EinsumDense` does, so it is one token.
        match = re.fullmatch(r"([a-zA-Z0]+),([a-zA-Z]+)->([a-zA-Z0]+)",
                             compact.replace("...", "0"))
        if match is None:
            raise _invalid(
                "equation", "an einsum string of the form 'ab,bc->ac', "
                "'...ab,bc->...ac' or 'ab...,bc->ac...'", equation)
        self.equation = equation
        self.input_spec, self.weight_spec, self.output_spec = match.groups()
        shared = [c for c in self.weight_spec
                  if c in self.input_spec and c in self.output_spec]
        if shared:
            raise _invalid(
                "equation", "a kernel whose axes are each either contracted with "
                "the input or only in the output (an axis in the input, the kernel "
                f"and the output, here {''.join(shared)!r}, makes the kernel a "
                "batch of matrices, which a single low-rank product cannot "
                "represent)", equation)
        self.contracted = "".join(c for c in self.weight_spec if c in self.input_spec)
        self.outputs = "".join(c for c in self.weight_spec if c in self.output_spec)
        if not self.contracted or not self.outputs:
            raise _invalid(
                "equation", "a kernel with at least one axis contracted with the "
                "input and one output axis", equation)
        used = set(compact)
        r = next(c for c in string.ascii_letters if c not in used)
        middle = "".join(c for c in self.input_spec if c in self.output_spec or c == "0")
        self.equation_a = self._dots(f"{self.input_spec},{self.contracted}{r}->{middle}{r}")
        self.equation_b = self._dots(f"{middle}{r},{r}{self.outputs}->{self.output_spec}")
        # kernel axes in (contracted..., outputs...) order -> weight-spec order.
        order = self.contracted + self.outputs
        self.to_kernel_order = [order.index(c) for c in self.weight_spec]
        self.from_kernel_order = [self.weight_spec.index(c) for c in order]

    @staticmethod
    def _dots(equation):
        return equation.replace("0", "...")

    def split_shape(self, kernel_shape):
        """`(contracted_shape, output_shape)` of a kernel of `kernel_shape`."""
        dims = dict(zip(self.weight_spec, kernel_shape))
        return (tuple(int(dims[c]) for c in self.contracted),
                tuple(int(dims[c]) for c in self.outputs))

    def matrix_shape(self, kernel_shape):
        """The `(m, n)` shape of the matricized kernel."""
        contracted, outputs = self.split_shape(kernel_shape)
        return math.prod(contracted), math.prod(outputs)

    def to_matrix(self, kernel):
        """The kernel as an `(m, n)` NumPy matrix (contracted x output axes)."""
        kernel = np.asarray(kernel)
        return np.transpose(kernel, self.from_kernel_order).reshape(
            self.matrix_shape(kernel.shape))

    def from_matrix(self, matrix, kernel_shape):
        """Inverse of `to_matrix`."""
        contracted, outputs = self.split_shape(kernel_shape)
        return np.transpose(np.asarray(matrix).reshape(contracted + outputs),
                            self.to_kernel_order)

    def input_shape(self, kernel_shape, output_shape=None):
        """An input shape (batch axes `None`, one axis under `...`) that builds
        a layer with a kernel of `kernel_shape`.

        Without `...`, axes shared by the input and the output take their size
        from `output_shape` (the partial output shape of `EinsumDense`), which
        `EinsumDense.build` requires to match.
        """
        dims = {}
        if output_shape is not None and "0" not in self.output_spec:
            sizes = zip(self.output_spec[1:], tuple(output_shape))
            dims.update((c, d) for c, d in sizes if d is not None)
        dims.update(zip(self.weight_spec, kernel_shape))
        return tuple(None if c not in dims else int(dims[c]) for c in self.input_spec)

    def kernel_shape_of_factors(self, a_shape, b_shape):
        """The kernel shape implied by factors with their axes
        (`contracted + (k,)` and `(k,) + outputs`), or `None` for 2-D
        factors of a kernel with more axes."""
        if len(a_shape) != len(self.contracted) + 1 or len(b_shape) != len(self.outputs) + 1:
            return None
        dims = dict(zip(self.contracted, a_shape[:-1]))
        dims.update(zip(self.outputs, b_shape[1:]))
        return tuple(int(dims[c]) for c in self.weight_spec)

    def input_rows(self, x):
        """The layer input `x` as rows of contracted features, `(-1, m)`: the
        `X` of `y = X W`."""
        x = np.asarray(x)
        spec = self.input_spec
        if "0" in spec:
            n_ellipsis = x.ndim - (len(spec) - 1)
            pos = spec.index("0")
            spec = spec[:pos] + "".join(chr(0x100 + i) for i in range(n_ellipsis)) \
                + spec[pos + 1:]
        batch_axes = [i for i, c in enumerate(spec) if c not in self.contracted]
        contracted_axes = [spec.index(c) for c in self.contracted]
        m = math.prod(x.shape[i] for i in contracted_axes)
        return np.transpose(x, batch_axes + contracted_axes).reshape(-1, m)


