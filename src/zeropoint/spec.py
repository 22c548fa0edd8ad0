"""QuantSpec: the one description of a quantizer that flows through zeropoint.

A spec says how many bits, which scheme (symmetric or asymmetric), and at which granularity the
scale and zero-point are shared. Every granularity is expressed as a ``block_size``: the extent of
one block of elements that shares a scale, one entry per tensor dimension (the torchao idea), so
a single quantize function serves them all.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


class Scheme(str, Enum):
    SYMMETRIC = "symmetric"  # signed codes, zero-point 0
    ASYMMETRIC = "asymmetric"  # unsigned codes, integer zero-point inside the code range


# How a block's scale (and a float zero-point) is stored: float16 halves what the scales of
# small groups cost (at 4 bits in groups of 32: 0.5 instead of 1 bit per weight).
SCALE_DTYPES = ("float32", "float16")
# "integer": the zero-point is a code, so real 0 is exact. "float": any real offset, stored as
# the block's minimum m (x = s * q + m, ggml's Q4_1 form), so a grid need not hold 0.
ZERO_POINTS = ("integer", "float")


class Granularity(str, Enum):
    PER_TENSOR = "per_tensor"
    PER_CHANNEL = "per_channel"
    PER_GROUP = "per_group"


def parse_enum(enum_type, value, what: str):
    try:
        return enum_type(value)
    except ValueError:
        accepted = ", ".join(repr(e.value) for e in enum_type)
        raise ValueError(f"unknown {what} {value!r}; accepted: {accepted}") from None


@dataclass(frozen=True)
class QuantSpec:
    """How to quantize a tensor.

    Codes are signed in [-2^(b-1), 2^(b-1)-1] for symmetric (narrow range drops the lowest code,
    so the grid is mirror-symmetric around 0) and unsigned in [0, 2^b-1] for asymmetric.
    """

    bits: int = 8  # 8 bits keeps the error below what most models notice
    scheme: Scheme = Scheme.ASYMMETRIC  # asymmetric wastes no levels on skewed data
    granularity: Granularity = Granularity.PER_TENSOR  # the chapter's starting point
    # Per-channel: the channel axis (default 0, a Linear weight's output features).
    # Per-group: the axis along which groups run (default -1, a Linear weight's input features).
    axis: int | None = None
    group_size: int | None = None  # per-group only: elements that share one scale
    narrow_range: bool = False  # symmetric only: [-(2^(b-1)-1), 2^(b-1)-1]
    scale_dtype: str = "float32"  # how scales (and float zero-points) are stored: SCALE_DTYPES
    zero_point: str = "integer"  # asymmetric only: ZERO_POINTS

    def __post_init__(self):
        if isinstance(self.bits, bool) or not isinstance(self.bits, int):
            raise TypeError(f"bits must be an int in 1..8, got {self.bits!r}")
        if not 1 <= self.bits <= 8:
            raise ValueError(f"bits must be 1..8, got {self.bits}")
        object.__setattr__(self, "scheme", parse_enum(Scheme, self.scheme, "scheme"))
        object.__setattr__(
            self, "granularity", parse_enum(Granularity, self.granularity, "granularity")
        )
        if self.symmetric and self.bits < 2:
            raise ValueError(
                "symmetric quantization needs at least 2 bits (one bit cannot hold a sign and a "
                "magnitude); use scheme='asymmetric' for 1 bit"
            )
        if self.narrow_range and not self.symmetric:
            raise ValueError("narrow_range applies to the symmetric scheme only")
        if self.scale_dtype not in SCALE_DTYPES:
            raise ValueError(f"unknown scale_dtype {self.scale_dtype!r}; accepted: "
                             + ", ".join(repr(d) for d in SCALE_DTYPES))
        if self.zero_point not in ZERO_POINTS:
            raise ValueError(f"unknown zero_point {self.zero_point!r}; accepted: "
                             + ", ".join(repr(z) for z in ZERO_POINTS))
        if self.float_zero_point and self.symmetric:
            raise ValueError("zero_point 'float' applies to the asymmetric scheme only (a "
                             "symmetric grid's zero-point is 0)")
        if self.axis is not None and (isinstance(self.axis, bool) or not isinstance(self.axis, int)):
            raise TypeError(f"axis must be an int or None, got {self.axis!r}")
        if self.granularity is Granularity.PER_GROUP:
            if not isinstance(self.group_size, int) or self.group_size < 1:
                raise ValueError(
                    f"per_group needs group_size, a positive int, got {self.group_size!r}"
                )
        elif self.group_size is not None:
            raise ValueError(
                f"group_size is for granularity 'per_group', not {self.granularity.value!r}"
            )
        if self.granularity is Granularity.PER_TENSOR and self.axis is not None:
            raise ValueError("axis is for 'per_channel' and 'per_group', not 'per_tensor'")

    @property
    def symmetric(self) -> bool:
        return self.scheme is Scheme.SYMMETRIC

    @property
    def float_zero_point(self) -> bool:
        return self.zero_point == "float"

    @property
    def scale_nbytes(self) -> int:
        """Bytes one stored scale (or float zero-point) takes."""
        return 2 if self.scale_dtype == "float16" else 4

    @property
    def qmin(self) -> int:
        if not self.symmetric:
            return 0
        return -(2 ** (self.bits - 1)) + (1 if self.narrow_range else 0)

    @property
    def qmax(self) -> int:
        return 2 ** (self.bits - 1) - 1 if self.symmetric else 2**self.bits - 1

    @property
    def code_dtype(self) -> torch.dtype:
        """The narrowest torch integer dtype that holds every code without overflow."""
        import torch  # here, not at the top: the command line parses specs without torch

        return torch.int8 if self.symmetric else torch.uint8

    def resolved_axis(self, ndim: int) -> int:
        """The axis this spec works along, as a non-negative index into a tensor of `ndim` dims."""
        if self.granularity is Granularity.PER_TENSOR:
            raise ValueError("a per_tensor spec has no axis")
        axis = self.axis
        if axis is None:
            axis = 0 if self.granularity is Granularity.PER_CHANNEL else -1
        if not -ndim <= axis < ndim:
            raise ValueError(
                f"axis {axis} is out of range for a tensor with {ndim} dimension(s); "
                f"accepted: {-ndim}..{ndim - 1}"
            )
        return axis % ndim

    def block_size(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Extent of one scale block in each dimension of a tensor of `shape`."""
        shape = tuple(shape)
        if self.granularity is Granularity.PER_TENSOR:
            return shape
        axis = self.resolved_axis(len(shape))
        if self.granularity is Granularity.PER_CHANNEL:
            return tuple(1 if d == axis else n for d, n in enumerate(shape))
        # A group size that does not divide the axis leaves a shorter last group (see
        # core.padded_shape): exact, as every block's range holds 0.
        return tuple(self.group_size if d == axis else 1 for d in range(len(shape)))

    def describe(self) -> str:
        """Short human label, e.g. 'int4 asym g128' or 'int8 sym per-channel'."""
        scheme = "sym" if self.symmetric else "asym"
        if self.granularity is Granularity.PER_GROUP:
            where = f"g{self.group_size}"
        else:
            where = self.granularity.value.replace("_", "-")
        narrow = " narrow" if self.narrow_range else ""
        fzp = " float-zp" if self.float_zero_point else ""
        fp16 = " fp16-scales" if self.scale_dtype == "float16" else ""
        return f"int{self.bits} {scheme}{narrow} {where}{fzp}{fp16}"

    def to_dict(self) -> dict:
        return {
            "bits": self.bits,
            "scheme": self.scheme.value,
            "granularity": self.granularity.value,
            "axis": self.axis,
            "group_size": self.group_size,
            "narrow_range": self.narrow_range,
            "scale_dtype": self.scale_dtype,
            "zero_point": self.zero_point,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "QuantSpec":
        return cls(**d)

