"""Analysis metrics and the `analyze` command's JSON and PNG."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from vidcrypt import api
from vidcrypt.cli import main
from vidcrypt.metrics import correlations, entropy, npcr_uaci, psnr, ssim
from vidcrypt.paper_cipher import PaperConfig


def test_metrics_on_known_inputs() -> None:
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, (256, 256), dtype=np.uint8)
    ramp = np.tile(np.arange(256, dtype=np.uint8), (256, 1))
    assert entropy(np.zeros(100, np.uint8)) == 0.0
    assert entropy(np.arange(256, dtype=np.uint8)) == pytest.approx(8.0)
    assert entropy(noise) > 7.99
    assert correlations([ramp])["horizontal"] == pytest.approx(1.0)
    assert abs(correlations([noise])["vertical"]) < 0.02
    assert npcr_uaci(noise, noise) == (0.0, 0.0)
    npcr, uaci = npcr_uaci(noise, rng.integers(0, 256, noise.shape, dtype=np.uint8))
    assert npcr == pytest.approx(99.61, abs=0.1) and uaci == pytest.approx(33.46, abs=0.5)
    assert math.isinf(psnr(noise, noise)) and ssim(noise, noise) == pytest.approx(1.0)


def test_analyze_reports_and_figure(
    tiny_avi: Path,
    keypair: tuple[Path, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    pub = keypair[1]
    results = {}
    for name, mode, layers in (("secure", "secure", 2), ("paper", "paper", 2), ("rsa", "paper", 1)):
        enc = tmp_path / f"{name}.vcr"
        api.encrypt(tiny_avi, enc, pub, mode=mode, paper=PaperConfig(layers=layers))
        out = tmp_path / f"{name}.json"
        assert main(["analyze", str(tiny_avi), str(enc), "--json", str(out)]) == 0
        capsys.readouterr()
        results[name] = json.loads(out.read_text())
        assert (tmp_path / f"{name}.png").stat().st_size > 1000
    sec, pap, rsa = results["secure"], results["paper"], results["rsa"]
    assert sec["entropy"] > 7.99 and sec["npcr"] > 99.0
    assert abs(sec["correlation"]["horizontal"]) < 0.05
    assert sec["npcr_if_key_and_nonce_were_reused"] < 0.1
    assert pap["levels"] == 512 and pap["size_ratio"] > 1.4
    assert pap["npcr"] < 0.1  # one changed pixel changes one value: no diffusion
    assert rsa["entropy"] == pytest.approx(rsa["entropy_original"])  # a substitution
    assert rsa["factored_n"] == [17, 19]
