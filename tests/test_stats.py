"""Difference tests, TOST equivalence tests and Holm's correction of otmdr.report.stats, against scipy."""

from __future__ import annotations

import importlib.util
import math
import random

import pytest
from scipy import stats

from otmdr.report.stats import (
    DEFAULT_MARGINS,
    TEST_METHOD,
    PairedDifference,
    adjust_family,
    describe_tests,
    format_paired,
    holm,
    paired_difference,
    paired_table,
    parse_margins,
)


def _random_pairs(rng: random.Random, n: int, shift: float, spread: float) -> tuple[list[float], list[float]]:
    reference = [rng.gauss(80.0, 2.0) for _ in range(n)]
    return [r + rng.gauss(shift, spread) for r in reference], reference


# ----------------------------------------------------------------------------------- the p-values
@pytest.mark.parametrize("seed", range(8))
def test_p_values_match_scipy(seed):
    rng = random.Random(seed)
    n = rng.choice([2, 3, 5, 10])
    margin = rng.choice([0.1, 0.5, 2.0])
    values, reference = _random_pairs(rng, n, shift=rng.uniform(-1.5, 1.5), spread=rng.uniform(0.05, 2.0))
    d = paired_difference(values, reference, higher_is_better=True, margin=margin)
    assert d.p_difference == pytest.approx(stats.ttest_rel(values, reference).pvalue, rel=1e-9, abs=1e-15)
    diffs = [a - b for a, b in zip(values, reference)]
    tost = max(stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue,
               stats.ttest_1samp(diffs, margin, alternative="less").pvalue)
    assert d.p_equivalence == pytest.approx(tost, rel=1e-9, abs=1e-15)
    assert paired_difference(values, reference, higher_is_better=True).p_equivalence is None  # no margin


@pytest.mark.parametrize("seed", range(40))
def test_tests_agree_with_the_95_and_90_percent_intervals(seed):
    rng = random.Random(100 + seed)
    n = rng.choice([2, 3, 4, 6, 10])
    margin = 0.5
    values, reference = _random_pairs(rng, n, shift=rng.uniform(-1.0, 1.0), spread=rng.uniform(0.05, 1.5))
    d = paired_difference(values, reference, higher_is_better=True, margin=margin)
    diffs = [a - b for a, b in zip(values, reference)]
    mean, se = sum(diffs) / n, stats.tstd(diffs) / math.sqrt(n)
    t95, t90 = stats.t.ppf(0.975, n - 1), stats.t.ppf(0.95, n - 1)
    assert (d.p_difference < 0.05) == (mean - t95 * se > 0 or mean + t95 * se < 0) == (d.low > 0 or d.high < 0)
    assert (d.p_equivalence < 0.05) == (-margin < mean - t90 * se and mean + t90 * se < margin)


def test_a_seed_set_where_both_tests_reject_and_one_where_neither_does_are_covered():
    """The random data sets above must exercise every branch, or the agreement check proves little."""
    outcomes = set()
    for seed in range(40):
        rng = random.Random(100 + seed)
        n = rng.choice([2, 3, 4, 6, 10])
        values, reference = _random_pairs(rng, n, shift=rng.uniform(-1.0, 1.0), spread=rng.uniform(0.05, 1.5))
        d = paired_difference(values, reference, higher_is_better=True, margin=0.5)
        outcomes.add((d.p_difference < 0.05, d.p_equivalence < 0.05))
    assert {(True, False), (False, True), (False, False)} <= outcomes


# ----------------------------------------------------------------------------------- the verdicts
def test_verdicts_for_tight_wide_and_tiny_consistent_effects():
    tight = paired_difference([80.1, 80.0, 79.95, 80.05, 80.0], [80.0] * 5, higher_is_better=True, margin=0.5)
    assert tight.verdict == "equivalent within ±0.50"
    wide = paired_difference([81.0, 79.0, 82.0, 78.5, 80.0], [80.0] * 5, higher_is_better=True, margin=0.5)
    assert wide.verdict == "inconclusive with 5 seeds"
    tiny = paired_difference([80.10, 80.11, 80.09, 80.10, 80.12], [80.0] * 5, higher_is_better=True, margin=0.5)
    assert tiny.verdict == "better, yet within ±0.50"
    assert paired_difference([80.10, 80.11, 80.09], [80.0] * 3, higher_is_better=False,
                             margin=0.5).verdict == "worse, yet within ±0.50"
    big = paired_difference([82.0, 82.5, 81.5, 82.2], [80.0] * 4, higher_is_better=True, margin=0.5)
    assert big.verdict == "better"
    nll = paired_difference([0.501, 0.499, 0.5], [0.5] * 3, higher_is_better=False, margin=0.02, digits=4)
    assert nll.verdict == "equivalent within ±0.0200"
    # without a margin the old wording stays: there is no equivalence question to be inconclusive about
    assert paired_difference([81.0, 79.0, 82.0], [80.0] * 3, higher_is_better=True).verdict == \
        "no difference detectable with 3 seeds"


def test_zero_variance_and_one_seed():
    same_gain = paired_difference([81.0, 82.0, 83.0], [80.0, 81.0, 82.0], higher_is_better=True, margin=0.5)
    assert (same_gain.p_difference, same_gain.p_equivalence) == (0.0, 1.0)
    assert same_gain.verdict == "better (every seed differs by the same amount)"
    small_gain = paired_difference([80.25, 81.25], [80.0, 81.0], higher_is_better=True, margin=0.5)
    assert (small_gain.p_difference, small_gain.p_equivalence) == (0.0, 0.0)
    assert small_gain.verdict == "better, yet within ±0.50 (every seed differs by the same amount)"
    identical = paired_difference([80.0, 81.0], [80.0, 81.0], higher_is_better=True, margin=0.5)
    assert (identical.p_difference, identical.p_equivalence) == (1.0, 0.0)
    assert identical.verdict == "equivalent within ±0.50"
    at_margin = paired_difference([80.5, 81.5], [80.0, 81.0], higher_is_better=False, margin=0.5)
    assert at_margin.p_equivalence == 1.0 and at_margin.verdict == "worse (every seed differs by the same amount)"
    one = paired_difference([81.0], [80.0], higher_is_better=True, margin=0.5)
    assert (one.low, one.p_difference, one.p_equivalence) == (None, None, None)
    assert one.verdict == "one seed: no interval" and one.holm_verdict is None
    with pytest.raises(ValueError, match="margin"):
        paired_difference([1.0, 2.0], [1.0, 2.0], higher_is_better=True, margin=0.0)


def test_a_hand_built_difference_without_p_values_reads_its_interval():
    assert PairedDifference(1.0, 0.5, 1.5, 3, True).verdict == "better"
    assert PairedDifference(1.0, -0.5, 2.5, 3, True).verdict == "no difference detectable with 3 seeds"


# ------------------------------------------------------------------------------------------ Holm
def test_holm_by_hand():
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # sorted 0.01, 0.02, 0.5: x3 = 0.03, x2 = 0.04, x1 = 0.5
    assert holm([0.5, 0.01, 0.02]) == pytest.approx([0.5, 0.03, 0.04])
    # step-down monotonicity: 0.02 x 2 = 0.04 would undercut 0.015 x 3 = 0.045; both become 0.045
    assert holm([0.02, 0.015, 0.9]) == pytest.approx([0.045, 0.045, 0.9])
    assert holm([0.4, 0.6]) == pytest.approx([0.8, 0.8])
    assert holm([0.7, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == [] and holm([0.03]) == [0.03]
    with pytest.raises(ValueError):
        holm([0.1, float("nan")])
    with pytest.raises(ValueError):
        holm([1.5])


def test_holm_matches_statsmodels():
    if importlib.util.find_spec("statsmodels") is None:
        pytest.skip("statsmodels is not installed (not a dependency of otmdr)")
    from statsmodels.stats.multitest import multipletests

    rng = random.Random(7)
    for _ in range(20):
        p = [rng.random() ** 3 for _ in range(rng.randint(1, 12))]
        assert holm(p) == pytest.approx(list(multipletests(p, method="holm")[1]))


def _summary(seed: int, accuracy: float, nll: float = 0.5, ece: float = 0.05) -> dict:
    return {"seed": seed, "test": {"accuracy": accuracy, "nll": nll, "ece": ece},
            "early_stopped": {"test": {"accuracy": accuracy - 0.001, "nll": nll, "ece": ece}}}


def test_adjust_family_over_two_tables_turns_a_marginal_better_inconclusive():
    # sam: +1, +2, +1.5, +1, +2 pp over sgd: the t test gives p ~ 0.002, raw "better"
    summaries = {"sgd": [_summary(s, a) for s, a in enumerate([0.80, 0.81, 0.79, 0.80, 0.82])],
                 "sam": [_summary(s, a) for s, a in enumerate([0.81, 0.83, 0.805, 0.81, 0.84])]}
    final = paired_table(summaries, "sgd")
    early = paired_table(summaries, "sgd", test_block=lambda s: s["early_stopped"]["test"])
    raw = final[0]["accuracy (pp)"]
    assert raw.verdict == "better" and raw.holm_verdict is None and 0.001 < raw.p_difference < 0.05 / 12
    assert "Holm" not in format_paired(final, markdown=False)
    (adj_final, adj_early), family = adjust_family([final, early])
    # per table: 3 metrics x 2 tests, NLL and ECE identical (zero variance): all six are tests
    assert family == 12
    adjusted = adj_final[0]["accuracy (pp)"]
    assert adjusted.holm_p_difference == pytest.approx(holm(_family_p(final + early))[0])
    assert final[0]["accuracy (pp)"].holm_p_difference is None  # inputs untouched
    assert (adjusted.mean, adjusted.low, adjusted.p_difference) == (raw.mean, raw.low, raw.p_difference)
    assert adjusted.holm_verdict == "better"  # p ~ 0.003, x 8 after the four zero p-values: still < 0.05
    assert adj_final[0]["NLL"].holm_verdict == "equivalent within ±0.0200"  # p 0 stays 0

    # a marginal gain (p just under 0.05) is "better" raw, but not after 12 tests
    marginal = {"sgd": [_summary(s, 0.80) for s in range(3)],
                "sam": [_summary(s, a) for s, a in enumerate([0.81, 0.8125, 0.8175])]}
    final = paired_table(marginal, "sgd")
    early = paired_table(marginal, "sgd", test_block=lambda s: s["early_stopped"]["test"])
    assert final[0]["accuracy (pp)"].verdict == "better"
    assert 0.01 < final[0]["accuracy (pp)"].p_difference < 0.05
    (adj_final, _), family = adjust_family([final, early])
    acc = adj_final[0]["accuracy (pp)"]
    assert family == 12 and acc.holm_p_difference > 0.05
    assert acc.holm_verdict == "inconclusive with 3 seeds"
    text = format_paired(adj_final, markdown=False)
    assert "better; Holm: inconclusive with 3 seeds" in text
    assert "equivalent within ±0.0200; Holm: unchanged" in text
    assert "Holm" not in format_paired(adj_final, markdown=True, holm=False)


def _family_p(rows: list[dict]) -> list[float]:
    out = []
    for row in rows:
        for title in ("accuracy (pp)", "NLL", "ECE (pp)"):
            out += [row[title].p_difference, row[title].p_equivalence]
    return out


def test_adjust_family_leaves_one_seed_rows_out():
    one = {"sgd": [_summary(0, 0.8)], "sam": [_summary(0, 0.81)]}
    (table,), family = adjust_family([paired_table(one, "sgd")])
    assert family == 0 and table[0]["accuracy (pp)"].holm_verdict is None
    assert "(one seed: no interval)" in format_paired(table, markdown=False)


# ----------------------------------------------------------------------------------- the margins
def test_parse_margins():
    assert parse_margins("0.5") == {"accuracy (pp)": 0.5, "NLL": 0.02, "ECE (pp)": 0.5}
    assert parse_margins("1") == {**DEFAULT_MARGINS, "accuracy (pp)": 1.0}
    assert parse_margins("accuracy=0.25, nll=0.01,ECE=1") == {"accuracy (pp)": 0.25, "NLL": 0.01, "ECE (pp)": 1.0}
    assert parse_margins("nll=0.005") == {**DEFAULT_MARGINS, "NLL": 0.005}


@pytest.mark.parametrize("text, match", [("loss=0.1", "unknown metric 'loss'"), ("abc", "not a number"),
                                         ("nll=x", "not a number"), ("0", "positive"), ("ece=-1", "positive"),
                                         ("inf", "positive"), ("nan", "positive"), ("0.5,0.2", "name each"),
                                         ("nll=0.1,nll=0.2", "twice"), ("", "not a number")])
def test_parse_margins_rejects_with_one_line(text, match):
    with pytest.raises(ValueError, match=match) as error:
        parse_margins(text)
    assert "\n" not in str(error.value)


def test_paired_table_uses_the_margins_and_the_metric_digits():
    summaries = {"sgd": [_summary(s, 0.80, nll=0.50) for s in range(3)],
                 "sam": [_summary(s, a, nll=n) for s, (a, n) in enumerate([(0.801, 0.53), (0.80, 0.47),
                                                                            (0.799, 0.50)])]}
    row = paired_table(summaries, "sgd")[0]
    assert row["accuracy (pp)"].margin == 0.5 and row["accuracy (pp)"].verdict == "equivalent within ±0.50"
    assert row["NLL"].margin == 0.02 and row["NLL"].verdict == "inconclusive with 3 seeds"
    wider = paired_table(summaries, "sgd", margins=parse_margins("nll=0.5"))[0]
    assert wider["NLL"].verdict == "equivalent within ±0.5000"
    with pytest.raises(ValueError, match="unknown metrics"):
        paired_table(summaries, "sgd", margins={"accuracy": 0.5})


def test_the_method_text_names_the_tests_and_margins():
    assert "TOST" in TEST_METHOD and "Holm" in TEST_METHOD and "accuracy 0.50 pp" in TEST_METHOD
    assert "NLL 0.0200" in TEST_METHOD and "90% CI" in TEST_METHOD
    assert "(12 tests)" in describe_tests(parse_margins("1"), family=12)
    assert "accuracy 1.00 pp" in describe_tests(parse_margins("1"))
