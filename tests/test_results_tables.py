"""The results READMEs' tables are what their CSVs say (tools.check_results):
the repository's own, and small READMEs that must fail."""

import textwrap

import pytest

from tools import check_results

CSV = """run,setting,noise_rate,test_accuracy,corrupt_accuracy,wall_seconds
a_seed0,a,0.0,0.5386,,600.0
b_seed0,b,0.5,0.8642,0.0434,1230.5
"""

MARKER = """<!-- table: summary.csv
| {noise_rate:.0%} | {test_accuracy:.3f} | {corrupt_accuracy:.3f} | {wall_seconds / 60:.1f} |
-->"""


def study(tmp_path, rows: str, marker: str = MARKER, csv: str = CSV, folder: str = "study"):
    """A study folder with summary.csv and a README whose table has `rows`."""
    d = tmp_path / folder
    d.mkdir(parents=True)
    (d / "summary.csv").write_text(csv)
    (d / "README.md").write_text(f"# A study\n\nSome text.\n\n{marker}\n"
                                 "| noise | test | corrupt | minutes |\n| --- | --- | --- | --- |\n"
                                 + textwrap.dedent(rows).strip() + "\n\nMore text.\n")
    return d


GOOD = """
| 0% | 0.539 | - | 10.0 |
| 50% | 0.864 | 0.043 | 20.5 |
"""


def test_the_repositorys_results_readmes_hold():
    errors, checked = check_results.check()
    assert errors == []
    assert checked >= 15  # every study's tables and the index's copies were checked
    errors, checked = check_results.check([check_results.INDEX])
    assert errors == [] and checked >= 3  # the copies in the index


def test_a_table_that_matches_its_csv_passes(tmp_path):
    d = study(tmp_path, GOOD)
    assert check_results.check([str(d)]) == ([], 1)
    assert check_results.main([str(d)]) == 0


def test_a_wrong_cell_fails_naming_readme_row_column_and_values(tmp_path, capsys):
    d = study(tmp_path, """
        | 0% | 0.539 | - | 10.0 |
        | 50% | 0.864 | 0.044 | 20.5 |
        """)
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1
    assert "README.md:" in errors[0] and "row b_seed0" in errors[0]
    assert "column 'corrupt'" in errors[0]
    assert "published '0.044', summary.csv gives '0.043'" in errors[0]
    assert check_results.main([str(d)]) == 1
    assert "0.044" in capsys.readouterr().err


def test_a_truncated_value_fails(tmp_path):
    # 0.5386 is printed as 0.538 (cut off) instead of 0.539 (rounded).
    d = study(tmp_path, """
        | 0% | 0.538 | - | 10.0 |
        | 50% | 0.864 | 0.043 | 20.5 |
        """)
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1
    assert "published '0.538', summary.csv gives '0.539' (truncated, not rounded)" in errors[0]


def test_other_digits_than_the_templates_fail(tmp_path):
    d = study(tmp_path, """
        | 0% | 0.54 | - | 10.0 |
        | 50% | 0.864 | 0.043 | 20.5 |
        """)
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1 and "published '0.54'" in errors[0]


def test_a_missing_row_fails(tmp_path):
    d = study(tmp_path, """
        | 50% | 0.864 | 0.043 | 20.5 |
        """)
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1
    assert "row a_seed0 of summary.csv is missing from the table" in errors[0]


def test_a_row_the_csv_does_not_have_fails(tmp_path):
    d = study(tmp_path, GOOD + "| 75% | 0.700 | 0.100 | 1.0 |\n")
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1 and "| 75% | 0.700 | 0.100 | 1.0 | is not in summary.csv" in errors[0]


def test_a_table_without_a_marker_fails_but_in_progress(tmp_path):
    d = study(tmp_path, GOOD, marker="")
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1 and "a table without a marker" in errors[0]
    d = study(tmp_path, GOOD, marker="", folder="other/in_progress")
    assert check_results.check([str(d)]) == ([], 0)
    d = study(tmp_path, GOOD, marker="<!-- table: text -->", folder="prose")
    assert check_results.check([str(d)]) == ([], 0)


def test_rows_helpers_and_lets(tmp_path):
    curves = "setting,curve,step,mean\nb,corrupt,1,0.1\nb,corrupt,2,0.6\nb,corrupt,3,0.4\n"
    marker = ("<!-- table: summary.csv\n"
              "row b: with noise\n"
              "key: setting\n"
              "let half = first_step('curves.csv', 0.5, setting=setting, curve='corrupt')\n"
              "| {label} | {one('curves.csv', 'mean', setting=key, step=3):.2f} | {half} "
              "| {fmt(first_step('curves.csv', 0.9), ',', 'never')} |\n"
              "-->")
    d = study(tmp_path, "| with noise | 0.40 | 2 | never |", marker)
    (d / "curves.csv").write_text(curves)
    assert check_results.check([str(d)]) == ([], 1)


def test_update_rewrites_the_rows_from_the_csv(tmp_path):
    d = study(tmp_path, "| 0% | 0.538 | - | 10.0 |")
    before = (d / "README.md").read_text()
    assert check_results.check([str(d)], update=True) == ([], 1)
    after = (d / "README.md").read_text()
    assert after == before.replace("| 0% | 0.538 | - | 10.0 |",
                                   "| 0% | 0.539 | - | 10.0 |\n| 50% | 0.864 | 0.043 | 20.5 |")
    assert check_results.check([str(d)]) == ([], 1)


@pytest.mark.parametrize("marker, message", [
    ("<!-- table: summary.csv\n| {test_accuracy:.3f} |\n-->", "the template has 1 cells"),
    ("<!-- table: summary.csv\n| {nothing} | a | b | c |\n-->", "NameError"),
    ("<!-- table: nowhere.csv\n| a | b | c | d |\n-->", "no file"),
    ("<!-- table: summary.csv\n-->", "no `| template |` row"),
])
def test_a_broken_marker_is_an_error(tmp_path, marker, message):
    d = study(tmp_path, GOOD, marker)
    errors, _ = check_results.check([str(d)])
    assert len(errors) == 1 and message in errors[0]


@pytest.mark.parametrize("mode", ["uniform", "permute"])
def test_labels_changed_counts_what_the_noise_changes(mode):
    import numpy as np

    from cg_tf.data.noise import corrupt_labels
    from tools import labels_changed
    labels = np.arange(400) % 10
    _, corrupt = corrupt_labels(labels, 0.5, mode, seed=3)
    row = labels_changed.changed([(str(i), int(y)) for i, y in enumerate(labels)], mode, 0.5, 3,
                                 10)
    assert row["changed"] == corrupt.sum() and row["train_examples"] == 400
    assert row["changed"] < row["selected"]  # some labels come out unchanged
    assert row["changed_share"] == corrupt.mean()
