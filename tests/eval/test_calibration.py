import json

import numpy as np
import pytest

import lmlab.eval.choice as choice
from lmlab.errors import ConfigError, DataError
from lmlab.eval.calibration import (
    brier_score,
    calibration,
    calibration_bins,
    expected_calibration_error,
    maximum_calibration_error,
    reliability_diagram,
)
from lmlab.eval.choice import evaluate_choice
from lmlab.eval.scoring import Continuation
from lmlab.eval.tasks import ChoiceItem, ChoiceTask

CONF = [0.9, 0.75, 0.58, 0.52]
CORRECT = [1, 0, 1, 0]


def test_ece_and_mce_on_the_hand_worked_example():
    """5 equal-width bins (module docstring of lmlab.eval.calibration):
    (0.4, 0.6]: 0.58, 0.52 acc 0.5 conf 0.55 -> 2/4 * 0.05 = 0.025
    (0.6, 0.8]: 0.75       acc 0   conf 0.75 -> 1/4 * 0.75 = 0.1875
    (0.8, 1.0]: 0.9        acc 1   conf 0.9  -> 1/4 * 0.1  = 0.025      ECE 0.2375, MCE 0.75
    """
    assert expected_calibration_error(CONF, CORRECT, n_bins=5) == pytest.approx(0.2375)
    assert maximum_calibration_error(CONF, CORRECT, n_bins=5) == pytest.approx(0.75)
    bins = calibration_bins(CONF, CORRECT, n_bins=5)
    assert [b.count for b in bins] == [0, 0, 2, 1, 1]
    assert bins[2].accuracy == 0.5 and bins[2].confidence == pytest.approx(0.55)


def test_equal_mass_bins_and_edge_cases():
    """2 equal-mass bins: {0.52, 0.58} (acc 0.5, conf 0.55) and {0.75, 0.9} (acc 0.5, conf
    0.825): ECE = 0.5 * 0.05 + 0.5 * 0.325 = 0.1875."""
    assert expected_calibration_error(CONF, CORRECT, 2, "mass") == pytest.approx(0.1875)
    assert [b.count for b in calibration_bins(CONF, CORRECT, 10, "mass")] == [1, 1, 1, 1]
    # a confidence on a bin edge belongs to the lower bin, ((m-1)/M, m/M]; 0 to the first
    assert [b.count for b in calibration_bins([0.0, 0.5, 1.0], [1, 1, 1], 2)] == [2, 1]
    assert expected_calibration_error([1.0, 1.0], [1, 1]) == 0.0  # perfectly calibrated
    with pytest.raises(ConfigError, match="binning='equal' is invalid"):
        calibration_bins(CONF, CORRECT, binning="equal")
    with pytest.raises(DataError, match=r"confidences must lie in \[0, 1\]"):
        calibration_bins([1.5], [1])


def test_brier_score():
    """[[0.8, 0.2]] gold 0: 0.2^2 + 0.2^2 = 0.08; [[0.5, 0.25, 0.25]] gold 2:
    0.25 + 0.0625 + 0.5625 = 0.875; mean over the two items 0.4775."""
    assert brier_score([[0.8, 0.2]], [0]) == pytest.approx(0.08)
    assert brier_score([[0.8, 0.2], [0.5, 0.25, 0.25]], [0, 2]) == pytest.approx(0.4775)


def test_calibration_of_a_choice_result_and_its_diagram(monkeypatch, tmp_path):
    """Stub log-likelihoods log(p): the confidences are exactly CONF (two choices each)."""
    probs = {f"q{i}": [c, 1 - c] for i, c in enumerate(CONF)}

    def stub(lm, requests, batch_size, progress):
        out = []
        for context, cont in requests:
            q = context.split("Question: ")[1].split("\n")[0]
            out.append(Continuation(float(np.log(probs[q][0 if cont == " a" else 1])), 1, False))
        return out

    monkeypatch.setattr(choice, "score_continuations", stub)
    items = tuple(ChoiceItem(f"q{i}", ("a", "b"), 0 if hit else 1) for i, hit in enumerate(CORRECT))
    result = evaluate_choice(None, ChoiceTask("t", items), progress=False)
    cal = calibration(result, n_bins=5)
    assert cal.ece == pytest.approx(0.2375) and cal.mce == pytest.approx(0.75)
    expected_brier = np.mean([2 * (1 - c) ** 2 if h else 2 * c**2 for c, h in zip(CONF, CORRECT)])
    assert cal.brier == pytest.approx(expected_brier)
    assert cal.accuracy == 0.5 and "ECE 0.238" in cal.summary()
    json.dumps(cal.to_dict())
    path = reliability_diagram(result, tmp_path / "plots" / "rel.png", n_bins=5)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
