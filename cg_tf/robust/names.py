"""How an aggregator reads and prints, from its record alone (no TensorFlow:
the TensorBoard plugin and the reports name runs' aggregators with it)."""


def spec(record: dict) -> str:
    """`name`, `name:value`, then `@layers` unless every layer, of an
    aggregator's record (`Aggregator.to_json`: its name, its one parameter
    and its layer filter when it has one): the form `aggregators.parse` reads."""
    values = [v for k, v in record.items() if k not in ("name", "layers")]
    out = record["name"] + "".join(f":{v}" for v in values)
    layers = record.get("layers", "all")
    return out if layers == "all" else f"{out}@{layers}"


# What tables and figures call the batch's mean gradient (the papers' name for it).
PLAIN_SGD = "plain SGD"


def label(record: dict) -> str:
    """What tables and figures call an aggregator: its spec, or PLAIN_SGD."""
    return PLAIN_SGD if record.get("name") == "mean" else spec(record)
