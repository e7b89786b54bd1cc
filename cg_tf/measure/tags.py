"""Names of the summaries a run writes, shared by the trainer, the TensorBoard
plugin and the plot tool (this module imports nothing heavy, so TensorBoard
can load the plugin without TensorFlow).

Every value is a plain scalar (the Scalars dashboard shows it too) except the
learning-time histograms and the run's configuration.
"""

PLUGIN_NAME = "memorization"
RUN_CONFIG = "memorization/run_config"  # JSON text at step 0, marks a cg_tf run

# The tracked examples the tab shows (cg_tf.measure.examples): at step 0 a
# string tensor, a JSON index (ids, groups, labels, class names) then each
# example's PNG thumbnail; at every evaluation an int64 tensor [3, shown]: each
# shown example's prediction, first learned step and learned-for-good step.
EXAMPLES = "memorization/examples"
EXAMPLE_STATES = "memorization/example_states"

SUBSETS = ("pristine", "corrupt", "mixed", "test")
GROUPS = ("pristine", "corrupt")  # tracked training examples, by label status


def eval_tag(subset: str, metric: str) -> str:
    """metric: accuracy (against the training label), true_label_accuracy, loss, top5."""
    return f"eval/{subset}/{metric}"


ADJUSTED_OVERFIT = "eval/adjusted_overfit"
TRAIN_LOSS = "train/loss"
TRAIN_ACCURACY = "train/accuracy"
LEARNING_RATE = "train/learning_rate"


def first_learned_tag(group: str) -> str:
    """Histogram (log-spaced steps) of the step each learned tracked example was
    first classified as its training label."""
    return f"learning/first_learned_step/{group}"


def learned_for_good_tag(group: str) -> str:
    """Histogram (log-spaced steps) of the step since which each tracked example
    classified as its training label has been so at every evaluation."""
    return f"learning/learned_for_good_step/{group}"


def learned_fraction_tag(group: str) -> str:
    return f"learning/learned_fraction/{group}"


def stayed_fraction_tag(group: str) -> str:
    """Fraction of the tracked examples learned and never forgotten since."""
    return f"learning/stayed_learned_fraction/{group}"


COHERENCE = "coherence/model"


def layer_coherence_tag(layer: str) -> str:
    return f"coherence/layer/{layer}"


def update_share_tag(update: str, group: str) -> str:
    """update: `mean` (the plain SGD update) or `aggregate` (the run's robust
    update, where it decomposes per example); group: pristine or corrupt."""
    return f"update/{update}/f_{group}"


def clipped_fraction_tag(group: str) -> str:
    return f"aggregator/clipped_fraction/{group}"


def removed_mass_tag(group: str) -> str:
    return f"aggregator/removed_mass/{group}"


def weight_norm_tag(layer: str) -> str:
    """The norm of a layer's weights (kernel and bias together)."""
    return f"health/weight_norm/{layer}"


def dead_units_tag(layer: str) -> str:
    """Share of a ReLU layer's units that output 0 on every example of the sample."""
    return f"health/dead_units/{layer}"


MAX_WEIGHT_GROWTH = "health/max_weight_growth"  # the largest norm / norm at the start
LOGITS_STD = "health/logits_std"
DEAD_UNITS = "health/dead_units"  # over every ReLU layer's units

PROBE_SHARE = "cost/probe_share"
EVAL_SHARE = "cost/eval_share"

# The papers' figure and the runs table.
ACCURACY_CURVES = {"pristine": eval_tag("pristine", "accuracy"),
                   "corrupt": eval_tag("corrupt", "accuracy"),
                   "test": eval_tag("test", "accuracy")}
TABLE_COLUMNS = {**{f"{k} accuracy": v for k, v in ACCURACY_CURVES.items()},
                 "adjusted overfit": ADJUSTED_OVERFIT}
