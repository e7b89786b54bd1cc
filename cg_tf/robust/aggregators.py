"""The aggregators: one small class each, one interface, one registry.

An aggregator turns a train step's batch into the update direction, over the
examples of the *global* batch, the same on every replica: Mean (the ordinary
batch gradient), Winsorized(c), Trimmed(c), Median, MedianOfMeans(k) (M3 is
k = 3), RM3 and RA3. docs/DESIGN.md, section 5, defines each one's update
exactly (each class's docstring says it in brief).

Their names and parameters read and print as `name` or `name:value`
(`winsorized:4`, `median_of_means:3`): `parse`, `Aggregator.spec`. Adding an
aggregator is one class and its `@register` line.

The per-example aggregators take a layer filter (`layer_filter`): which layers
they aggregate robustly, the others getting the batch's mean gradient
(`Winsorized(4, layers="hidden")`, read and printed `winsorized:4@hidden`).

The per-example aggregators get their values from the layer rules and reduce
them tile by tile (`tiled`), each replica a share of every variable's
coordinates over the global batch, got from the other replicas as factors or
as rows of values (`tiled.aggregate_batch`);
Winsorized, Trimmed and Median are order statistics (`OrderStatistic`): they say
which ranks they threshold at and what they make of the thresholds, which is
all the tiles need; the gradient probe measures them with the same tiles
(`probe_ranks`, `kept`).
"""

import dataclasses
import math
import numbers
from typing import ClassVar

import tensorflow as tf

from cg_tf.robust import layer_filter, layer_rules, names, tiled
from cg_tf.robust.collectives import Collectives, tally
from cg_tf.robust.gradients import GradientSource
from cg_tf.robust.layer_rules import PerExample, Stacked, Unexpanded, expanded

REGISTRY: dict[str, type["Aggregator"]] = {}


def register(cls: type["Aggregator"]) -> type["Aggregator"]:
    """Class decorator: makes `cls` known by its `name` to `parse` and `from_json`."""
    REGISTRY[cls.name] = cls
    return cls


def global_batch(x: tf.Tensor, sync: Collectives) -> int:
    """The number of examples in the global batch of which x is a replica's part."""
    if x.shape[0] is None:
        raise ValueError("the batch size must be static: batch the dataset with "
                         "drop_remainder=True")
    return x.shape[0] * sync.replicas


def mean_gradient(source: GradientSource, x, y, sync: Collectives):
    """This replica's part of the global batch's mean gradient (its examples'
    sum over the global batch size) and its tally."""
    g, losses, logits = source.summed(x, y)
    n = global_batch(x, sync)
    return [s / n for s in g], tally(y, losses, logits)


def global_values(source: GradientSource, x, y, sync: Collectives, chunk: int | None
                  ) -> tuple[list[PerExample], tf.Tensor]:
    """Per-example values of the global batch (replicas gather the factors,
    not the per-example gradients, in replica order, and a convolution's input
    rather than its patches where that is smaller), and this replica's tally."""
    values, losses, logits = source.per_example(x, y, chunk, sync, expand=False)
    return layer_rules.gathered(values, sync), tally(y, losses, logits)


@dataclasses.dataclass(frozen=True)
class Aggregator:
    """The interface (and the ordinary mean's behaviour where a subclass keeps it).

    name            what `parse`, the command lines and the run records call it
    parameter       the attribute that `name:value` sets, or None
    per_example     whether it needs per-example gradients (those take a
                    layer filter)
    allows_momentum whether SGD momentum may be used with it
    layers          which layers are aggregated robustly (a layer_filter
                    object or its name); the others get the mean gradient
    """

    name: ClassVar[str]
    parameter: ClassVar[str | None] = None
    per_example: ClassVar[bool] = False
    allows_momentum: ClassVar[bool] = True
    layers: layer_filter.LayerFilter = dataclasses.field(default=layer_filter.ALL,
                                                         kw_only=True)

    def __post_init__(self):
        value = self.value
        if self.parameter:
            whole = isinstance(value, numbers.Integral) or (
                isinstance(value, numbers.Real) and float(value).is_integer())
            if isinstance(value, bool) or not whole or value < 0:
                raise ValueError(f"{type(self).__name__}({self.parameter}={value!r}): "
                                 f"{self.parameter} must be a whole number of 0 or more")
            # NumPy's integers and whole floats (4.0) alike: the spec and names say 4.
            object.__setattr__(self, self.parameter, int(value))
        if isinstance(self.layers, str):
            object.__setattr__(self, "layers", layer_filter.parse(self.layers))
        if self.layers != layer_filter.ALL and not self.per_example:
            raise ValueError(f"{self.name} takes no layer filter (@{self.layers.name}): "
                             "only per-example aggregators choose layers")

    # -- names -------------------------------------------------------------------

    @property
    def value(self) -> int | None:
        return getattr(self, self.parameter) if self.parameter else None

    @property
    def _filtered(self) -> bool:
        return self.layers != layer_filter.ALL

    @property
    def spec(self) -> str:
        """`name`, `name:value`, then `@layers` unless every layer: the form
        `parse` reads."""
        return names.spec(self.to_json())

    @property
    def label(self) -> str:
        """What tables and figures call it: `plain SGD` for the mean, else its spec."""
        return names.label(self.to_json())

    @property
    def setting(self) -> str:
        """The spec as part of a file name (`winsorized_c4`, `winsorized_c4_hidden`)."""
        setting = (self.name if self.parameter is None
                   else f"{self.name}_{self.parameter}{self.value}")
        return f"{setting}_{self.layers.name}" if self._filtered else setting

    def to_json(self) -> dict:
        return {"name": self.name, **({self.parameter: self.value} if self.parameter else {}),
                **({"layers": self.layers.name} if self._filtered else {})}

    def by_layer(self, values: list[PerExample | Unexpanded], model, aggregate, replicas: int
                 ) -> list[tf.Tensor]:
        """A replica's part of the aggregate of the global batch: `aggregate(values,
        variables)` (a replica's share) for the layers of `model` aggregated
        robustly, and its part of the mean for the others', in the order of
        its trainable variables. `values` are per-example values of the
        global batch that every replica holds (its part of the mean: their
        mean over `replicas`), or of the replica's own examples (their sum
        over the global batch size, the same formula)."""
        variables = model.trainable_variables
        robust = self.layers.robust(model)
        (robust_values, mean_values), (robust_vars, mean_vars) = (
            layer_filter.split(values, robust), layer_filter.split(variables, robust))
        means = [tf.reshape(expanded(v).groups(1).stacked()[0] / (v.count * replicas), w.shape)
                 for v, w in zip(mean_values, mean_vars)]
        aggregated = aggregate(robust_values, robust_vars) if robust_values else []
        return layer_filter.merge(aggregated, means, robust)

    # -- checks ------------------------------------------------------------------

    def check(self, global_batch: int, replicas: int = 1, batch_name: str = "--batch_size"
              ) -> None:
        """Raises ValueError for a batch layout it cannot run with (the caller
        names the flag that chose this aggregator; `batch_name` is what the
        global batch size is called where it was given: a flag, an argument)."""
        if global_batch % replicas:
            raise ValueError(f"{batch_name}={global_batch} is not divisible by the "
                             f"{replicas} replicas")

    def check_momentum(self, momentum: float, name: str = "--momentum") -> None:
        """Raises ValueError for an optimizer's momentum (`name` what it is
        called: --momentum, Adam's beta_1) this aggregator refuses."""
        if momentum and not self.allows_momentum:
            raise ValueError(f"refuses {name}={momentum:g}: the papers found momentum "
                             "unstable with it; set it to 0 (train without momentum)")

    # -- the train step ----------------------------------------------------------

    def build(self, model, variables: list) -> tf.Module | None:
        """State kept across steps (checkpointed with `model`), or None."""
        return None

    def gradient(self, source: GradientSource, x, y, sync: Collectives,
                 chunk: int | None = None) -> tuple[list[tf.Tensor], tf.Tensor]:
        """This replica's part of the aggregated gradient of the global batch
        (x, y) of which each replica holds its slice (the parts of all replicas
        sum to it: the optimizer's all-reduce adds them), and this replica's
        tally [sum of losses, correct]."""
        return mean_gradient(source, x, y, sync)

    def finish(self, parts: list[tf.Tensor], state: tf.Module | None, sync: Collectives
               ) -> list[tf.Tensor]:
        """This replica's part of the update direction, from its part of this
        step's gradient (weight decay added)."""
        return parts


@register
@dataclasses.dataclass(frozen=True)
class Mean(Aggregator):
    """The ordinary batch gradient (plain SGD)."""

    name: ClassVar[str] = "mean"


@dataclasses.dataclass(frozen=True)
class OrderStatistic(Aggregator):
    """Per coordinate, thresholds at two ranks of the per-example values and an
    aggregate made of them (`tiled.Statistic`, computed tile by tile); here the
    ranks cut `cut_at(n)` values per side and the aggregate is the trimmed mean.
    A subclass with other ranks overrides `ranks`; one with another aggregate
    overrides `from_thresholds`, and then `kept` and `kept_count` (the
    gradient probe's split of the aggregate into the examples' parts) to match."""

    per_example: ClassVar[bool] = True
    uses_sum: ClassVar[bool] = True

    def cut_at(self, n: int) -> int:
        """Values cut per side of n."""
        raise NotImplementedError

    def ranks(self, n: int) -> tuple[int, int]:
        """The ranks (0 the smallest) of the low and high thresholds among n values."""
        c = self.cut_at(n)
        return c, n - 1 - c

    def from_thresholds(self, total, lo, hi, ranks, n):
        """The mean of the values between the thresholds, from the sum of all
        values clipped to them."""
        below, above = ranks[0], n - 1 - ranks[1]
        return (total - below * lo - above * hi) / (n - below - above)

    def gradient(self, source, x, y, sync, chunk=None):
        values, losses, logits = source.per_example(x, y, chunk, sync, expand=False)
        return self.by_layer(values, source.model,
                             lambda v, w: tiled.aggregate_batch(v, self, w, sync),
                             sync.replicas), tally(y, losses, logits)

    # -- the gradient probe --------------------------------------------------------

    def probe_ranks(self, probe_size: int, batch_size: int) -> tuple[int, int]:
        """The ranks measured on a probe of `probe_size` examples: the values the
        step cuts below and above at the batch, each scaled to the probe (at
        least 1 if it cuts any, at most up to the middle)."""
        lo, hi = self.ranks(batch_size)

        def scaled(cut: int) -> int:
            return min(max(round(cut * probe_size / batch_size), 1 if cut else 0),
                       (probe_size - 1) // 2)

        return scaled(lo), probe_size - 1 - scaled(batch_size - 1 - hi)

    def kept(self, g: tf.Tensor, lo: tf.Tensor, hi: tf.Tensor) -> tf.Tensor:
        """What remains of per-example values g given the thresholds: here the
        values between them (a value at a threshold counts as kept)."""
        return tf.where((g < lo) | (g > hi), tf.zeros_like(g), g)

    def kept_count(self, ranks: tuple[int, int], n: int) -> int:
        """The divisor that makes the kept values' sum the aggregate of n values."""
        return ranks[1] - ranks[0] + 1


@dataclasses.dataclass(frozen=True)
class CutAtC(OrderStatistic):
    """An order statistic that cuts c values per side, c its parameter."""

    c: int
    parameter: ClassVar[str] = "c"

    def cut_at(self, n: int) -> int:
        return self.c

    def check(self, global_batch, replicas=1, batch_name="--batch_size"):
        super().check(global_batch, replicas, batch_name)
        if not 0 <= 2 * self.c < global_batch:
            raise ValueError(f"need 0 <= 2c < {batch_name}={global_batch}")


@register
@dataclasses.dataclass(frozen=True)
class Winsorized(CutAtC):
    """Per coordinate, the mean with the c largest and c smallest values clipped
    to the (c+1)-th (exactly c per side, ties too); c = 0 is the mean."""

    name: ClassVar[str] = "winsorized"

    def from_thresholds(self, total, lo, hi, ranks, n):
        return total / n

    def kept(self, g, lo, hi):
        return tf.clip_by_value(g, lo, hi)

    def kept_count(self, ranks, n):
        return n


@register
@dataclasses.dataclass(frozen=True)
class Trimmed(CutAtC):
    """Per coordinate, the mean of the B - 2c middle values."""

    name: ClassVar[str] = "trimmed"


@register
@dataclasses.dataclass(frozen=True)
class Median(OrderStatistic):
    """The mean of the one or two middle values."""

    name: ClassVar[str] = "median"
    uses_sum: ClassVar[bool] = False

    def cut_at(self, n):
        return (n - 1) // 2

    def from_thresholds(self, total, lo, hi, ranks, n):
        return (lo + hi) / 2

    def probe_ranks(self, probe_size, batch_size):
        return self.ranks(probe_size)  # the probe's own middle


@register
@dataclasses.dataclass(frozen=True)
class MedianOfMeans(Aggregator):
    """The median of the means of k consecutive groups of the global batch.

    When every layer with weights sees one position per example, the group
    gradients come from one forward and backward through the layer rules (a
    group's Dense gradient is one matmul of its rows). Otherwise k ordinary
    passes: with positions (convolutions) a group's gradient from patches
    costs more than a native backward (on small_cnn 1.33x SGD against 0.99x),
    and with BatchNorm each group keeps its own statistics, as the authors'
    consecutive mini-batches do.
    """

    k: int = 3
    name: ClassVar[str] = "median_of_means"
    parameter: ClassVar[str] = "k"
    per_example: ClassVar[bool] = True
    allows_momentum: ClassVar[bool] = False

    def check(self, global_batch, replicas=1, batch_name="--batch_size"):
        super().check(global_batch, replicas, batch_name)
        if self.k < 1 or global_batch % self.k:
            raise ValueError(f"{self.k} groups do not divide {batch_name}={global_batch}")

    def gradient(self, source, x, y, sync, chunk=None):
        if not source.factored or source.bn or source.positions:
            return self._by_passes(source, x, y, sync)
        values, counts = global_values(source, x, y, sync, chunk)
        # The k group sums as k examples: their median, by tiles, over the group size.
        return self._median_of_groups([v.groups(self.k) for v in values], source.model,
                                      global_batch(x, sync) // self.k, sync), counts

    def _median_of_groups(self, groups: list[PerExample], model, size: int,
                          sync: Collectives):
        """A replica's part of the median of the k group sums over the group
        size (the mean of the group sums for the layers the filter leaves to
        the mean); every replica holds all k group sums."""
        medians = self.by_layer(groups, model,
                                lambda v, w: tiled.aggregate(v, Median(), w, sync),
                                sync.replicas)
        return [m / size for m in medians]

    def _by_passes(self, source, x, y, sync):
        """Each replica sums the gradients of its part of each global group, by
        ordinary backward passes over segments of gcd(replica batch, group
        size) examples: a segment lies in one group, whose index comes from the
        replica id as a tensor, so the step compiles whole as TPUStrategy runs
        it (with the layouts where a group is a multiple of the replica batch
        or the reverse, a segment is a group's whole part on the replica). The
        sums are all-reduced."""
        b = x.shape[0]
        size = global_batch(x, sync) // self.k
        s = math.gcd(b, size)
        first = sync.replica_id * b  # this replica's first example in the global batch
        sums = [tf.zeros([self.k, *v.shape], v.dtype) for v in source.variables]
        counts = tf.zeros([2])
        for m in range(b // s):
            g, losses, logits = source.summed(x[m * s:(m + 1) * s], y[m * s:(m + 1) * s])
            counts += tally(y[m * s:(m + 1) * s], losses, logits)
            slot = tf.one_hot((first + m * s) // size, self.k)
            sums = [acc + tf.reshape(tf.cast(slot, acc.dtype), [self.k] + [1] * gi.shape.rank)
                    * gi[None] for acc, gi in zip(sums, g)]
        group_sums = sync.sum(sums)
        return self._median_of_groups([Stacked(s) for s in group_sums], source.model,
                                      size, sync), counts


class History(tf.Module):
    """The gradients of the previous step and the one before, and the step count
    (a tf.Module: Keras' own lists are invisible to tf.train.Checkpoint)."""

    def __init__(self, variables: list):
        super().__init__(name="history")
        self.previous = [self._zeros(v, f"history_1_{j}") for j, v in enumerate(variables)]
        self.before = [self._zeros(v, f"history_2_{j}") for j, v in enumerate(variables)]
        self.count = tf.Variable(0, dtype=tf.int64, trainable=False, name="history_count",
                                 aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    @staticmethod
    def _zeros(v, name: str) -> tf.Variable:
        return tf.Variable(tf.zeros(v.shape, v.dtype), trainable=False, name=name,
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


@dataclasses.dataclass(frozen=True)
class Temporal(Aggregator):
    """A combination of this step's mean gradient and the two stored ones."""

    allows_momentum: ClassVar[bool] = False

    @staticmethod
    def combine(gs: list, older: list, oldest: list, ready: tf.Tensor) -> list:
        raise NotImplementedError

    def build(self, model, variables):
        return History(variables)

    def finish(self, parts, state: History, sync):
        """The combination needs the whole gradient: the parts are all-reduced
        first, and each replica returns its 1 / replicas of the result."""
        grads = sync.sum(parts)
        ready = state.count >= 2
        out = self.combine(grads, [tf.convert_to_tensor(h) for h in state.previous],
                           [tf.convert_to_tensor(h) for h in state.before], ready)
        for g, h1, h2 in zip(grads, state.previous, state.before):
            # Assigning a tensor shares its buffer: the shift copies nothing.
            h2.assign(h1)
            h1.assign(g)
        state.count.assign_add(1)
        return [o / sync.replicas for o in out]


def median3(a: tf.Tensor, b: tf.Tensor, c: tf.Tensor) -> tf.Tensor:
    """Elementwise median of three tensors."""
    return tf.maximum(tf.minimum(a, b), tf.minimum(tf.maximum(a, b), c))


# RM3 / RA3 run beside an ordinary step: one fused XLA computation for all
# variables (five separate kernels per variable cost 1.5x a plain SGD step on
# the 784-2048-10 net).

@tf.function(jit_compile=True)
def median3_after_two(gs: list, older: list, oldest: list, ready: tf.Tensor) -> list:
    """median3 of each (g, older, oldest) once `ready` (two stored steps), else zeros."""
    return [tf.where(ready, median3(g, a, b), tf.zeros_like(g))
            for g, a, b in zip(gs, older, oldest)]


@tf.function(jit_compile=True)
def mean3_after_two(gs: list, older: list, oldest: list, ready: tf.Tensor) -> list:
    """The mean of each (g, older, oldest) once `ready` (two stored steps), else zeros."""
    return [tf.where(ready, (g + a + b) / 3, tf.zeros_like(g))
            for g, a, b in zip(gs, older, oldest)]


@register
@dataclasses.dataclass(frozen=True)
class RM3(Temporal):
    """The elementwise median of this step's batch gradient and the two before;
    no update on the first two steps."""

    name: ClassVar[str] = "rm3"
    combine = staticmethod(median3_after_two)


@register
@dataclasses.dataclass(frozen=True)
class RA3(Temporal):
    """The mean of this step's batch gradient and the two before (RM3's control)."""

    name: ClassVar[str] = "ra3"
    combine = staticmethod(mean3_after_two)


# -- names ------------------------------------------------------------------------


def parse(spec: str, flag: str = "--aggregator") -> Aggregator:
    """The aggregator `spec` names (`name`, `name:value`, either with `@layers`);
    a ValueError naming `flag` (the flag the user typed) for an unknown name, a
    bad parameter or an unknown layer filter."""
    base, at, layers = spec.strip().partition("@")
    name, colon, value = base.partition(":")
    cls = REGISTRY.get(name)
    if cls is None:
        raise ValueError(f"{flag}={spec}: unknown aggregator {name!r}; one of "
                         f"{', '.join(REGISTRY)}")
    kwargs = {}
    if cls.parameter is None:
        if colon:
            raise ValueError(f"{flag}={spec}: {name} takes no parameter")
    elif not colon:
        raise ValueError(f"{flag}={spec}: {name} needs its {cls.parameter}, e.g. {name}:4")
    else:
        try:
            kwargs[cls.parameter] = int(value)
        except ValueError:
            raise ValueError(f"{flag}={spec}: {cls.parameter} must be an integer") from None
    if at:
        kwargs["layers"] = layers
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ValueError(f"{flag}={spec}: {e}") from None


def from_json(record: dict) -> Aggregator:
    """The aggregator of a run record (`Aggregator.to_json`)."""
    cls = REGISTRY[record["name"]]
    return cls(**({cls.parameter: record[cls.parameter]} if cls.parameter else {}),
               **({"layers": record["layers"]} if "layers" in record else {}))
