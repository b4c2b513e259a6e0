"""delta defaults to 1e-5 in every front end; a larger user-chosen delta is warned about.

(The demo's default is read in ``tests/test_cli.py`` (the console-script demo test), the
Accountant node's in ``tests/test_nodes.py``, the WebUI tab's in ``tests/test_webui.py``.)

Noise multipliers at epsilon = 1 (full sampling, one release), old default 1/(10 n) vs 1e-5,
are pinned in ``test_noise_multiplier_at_epsilon_1_old_and_new_default`` and quoted in the
closing note of the change that made 1e-5 the default.
"""

from __future__ import annotations

import inspect
import json
import logging

import pytest

from dpagg_core.cli import main
from dpagg_core.privacy.accountant import DEFAULT_DELTA, delta_warning, epsilon_for
from dpagg_core.privacy.calibration import calibrate
from dpagg_core.training import dpsgd


def test_library_defaults():
    assert DEFAULT_DELTA == 1e-5
    assert calibrate(1.0, n=50).delta == 1e-5
    assert epsilon_for(4.0, n=50).delta == 1e-5
    assert calibrate(1.0, n=50) == calibrate(1.0, 1e-5, 50, "full")
    assert dpsgd.calibrate_dpsgd(1.0, n=50, q=0.2, steps=10).delta == 1e-5
    assert inspect.signature(dpsgd.train_dpsgd).parameters["delta"].default == 1e-5
    assert inspect.signature(dpsgd.plan_for_sgd).parameters["delta"].default == 1e-5
    with pytest.raises(Exception, match="n"):
        calibrate(1.0)  # n has no default


@pytest.mark.parametrize(
    ("delta", "n", "warned", "mentions"),
    [
        (1e-5, 10, False, ()),
        (1e-6, 50, False, ()),
        (1e-5, 200_000, False, ()),  # the default itself is never warned about
        (2e-5, 10, True, ("the default 1e-05",)),
        (1e-3, 50, True, ("the default 1e-05", "n = 50")),
        (0.005, 50, True, ("1/(10 n) = 0.002", "22.17%")),
        (1e-4, None, True, ("the default",)),
    ],
)
def test_delta_warning_names_the_risk(delta, n, warned, mentions):
    text = delta_warning(delta, n)
    assert (text is not None) == warned
    if text:
        assert "fails completely" in text and "1e-05" in text
        for m in mentions:
            assert m in text


def test_noise_multiplier_at_epsilon_1_old_and_new_default():
    """Measured for the closing note: z at epsilon 1 (full, 1 release), delta 1/(10 n) vs 1e-5."""
    table = {
        n: (calibrate(1.0, 1 / (10 * n), n).noise_multiplier, calibrate(1.0, n=n).noise_multiplier)
        for n in (10, 50, 200)
    }
    for old, new in table.values():
        assert new > old  # a smaller delta costs more noise
    assert table[10][0] == pytest.approx(1.878, abs=1e-3)
    assert table[50][0] == pytest.approx(2.375, abs=1e-3)
    assert table[200][0] == pytest.approx(2.767, abs=1e-3)
    assert all(new == pytest.approx(3.7306, abs=1e-3) for _, new in table.values())


def _account(capsys, caplog, *extra):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="dpagg"):
        code = main(["account", "--epsilon", "1", "--n", "50", "--json", *extra])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    return json.loads(captured.out), caplog.text  # the CLI's log goes to stderr


def test_cli_default_and_warning(capsys, caplog):
    payload, err = _account(capsys, caplog)
    assert payload["plan"]["delta"] == 1e-5 and payload["delta_warning"] is None
    assert "probability that the guarantee fails outright" in payload["delta_meaning"]
    assert "WARNING" not in err.upper()
    payload, err = _account(capsys, caplog, "--delta", "1e-3")
    assert payload["plan"]["delta"] == 1e-3
    assert "fails completely" in payload["delta_warning"] and "fails completely" in err
    main(["account", "--epsilon", "1", "--n", "50"])
    assert "delta is the probability" in capsys.readouterr().out  # plain text says it too
