"""LFSR and per-pixel RSA table primitives."""

from __future__ import annotations

import numpy as np
import pytest

from vidcrypt.errors import ConfigError, IntegrityError
from vidcrypt.lfsr import (
    LFSRConfig,
    berlekamp_massey,
    chips,
    keystream_words,
    lfsr_bits,
    lfsr_period,
)
from vidcrypt.rsa_table import (
    RSAParams,
    fixed_points,
    public_table_inverse,
    rsa_decrypt,
    rsa_encrypt,
)


def test_default_lfsr_is_maximal_length() -> None:
    cfg = LFSRConfig()
    assert cfg.taps == (16, 14, 13, 11)
    assert lfsr_period(cfg) == 2**16 - 1
    bits = lfsr_bits(cfg)
    # An m-sequence has 2^(L-1) ones and 2^(L-1) - 1 zeros per period.
    assert int(bits.sum()) == 2**15


def test_lfsr_other_seeds_are_shifts_of_one_sequence() -> None:
    a = lfsr_bits(LFSRConfig(seed=1))
    b = lfsr_bits(LFSRConfig(seed=0xBEEF))
    doubled = np.concatenate([a, a])
    window = b[:64]
    hits = [o for o in range(a.size) if np.array_equal(doubled[o : o + 64], window)]
    assert len(hits) == 1


def test_non_primitive_polynomial_has_shorter_period() -> None:
    assert lfsr_period(LFSRConfig(taps=(4, 2), seed=1)) < 15
    assert lfsr_period(LFSRConfig(taps=(4, 3), seed=1)) == 15


def test_berlekamp_massey_recovers_register_from_2l_bits() -> None:
    bits = lfsr_bits(LFSRConfig(seed=0x1234))
    length, poly = berlekamp_massey(bits[:32])
    assert length == 16
    # The connection polynomial predicts the rest of the sequence.
    s = bits[:200].astype(int)
    for k in range(16, 200):
        assert sum(poly[i] * s[k - i] for i in range(1, 17)) % 2 == s[k]


def test_keystream_words_and_chips() -> None:
    cfg = LFSRConfig(seed=7)
    words = keystream_words(cfg, 9)
    assert words.size == 65535 // 3  # gcd(65535, 9) = 3
    assert int(words.max()) < 512
    bits = lfsr_bits(cfg)
    assert int(words[0]) == int("".join(str(b) for b in bits[:9]), 2)
    c = chips(cfg, 65530, 10)
    assert set(np.unique(c)) <= {-1.0, 1.0}
    assert np.array_equal(c[5:], 1.0 - 2.0 * bits[:5])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"seed": 0}, "seed"), ({"taps": (30, 3)}, "degree"), ({"taps": ()}, "empty")],
)
def test_lfsr_config_rejects_bad_values(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        LFSRConfig(**kwargs)


def test_rsa_defaults() -> None:
    rsa = RSAParams()
    assert (rsa.n, rsa.e, rsa.d, rsa.bits) == (323, 5, 173, 9)


@pytest.mark.parametrize("params", [RSAParams(), RSAParams(p=23, q=29, e=3), RSAParams(17, 61, 7)])
def test_rsa_table_round_trip_all_256_values(params: RSAParams) -> None:
    m = np.arange(256, dtype=np.uint8)
    c = rsa_encrypt(m, params)
    assert c.dtype == np.uint16 and int(c.max()) < params.n
    assert len(np.unique(c)) == 256
    assert np.array_equal(c, [pow(int(x), params.e, params.n) for x in m])
    assert np.array_equal(rsa_decrypt(c, params), m)
    # Inversion from the public (n, e) alone, no d.
    inv = public_table_inverse(params.n, params.e)
    assert np.array_equal(inv[c], m)


def test_rsa_fixed_points_and_corruption() -> None:
    params = RSAParams()
    fp = fixed_points(params)
    assert fp[:2] == [0, 1] and len(fp) >= 2
    assert pow(params.n - 1, params.e, params.n) == params.n - 1
    bad = np.array([params.n + 1], dtype=np.uint16)
    with pytest.raises(IntegrityError, match="not valid RSA images"):
        rsa_decrypt(bad, params)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"p": 15}, "p must be prime"),
        ({"p": 19, "q": 19}, "must differ"),
        ({"p": 3, "q": 5}, "modulus"),
        ({"e": 3}, "coprime"),
    ],
)
def test_rsa_params_validation(kwargs: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        RSAParams(**kwargs)
