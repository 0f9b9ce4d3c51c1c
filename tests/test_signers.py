"""Key custody backends: key files, PKCS#11 (SoftHSM), ssh-agent, SLIP-39 shares.

The SoftHSM and ssh-agent tests run the real programs (Debian packages
``softhsm2`` and ``openssh-client``) and skip only when those are absent.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import itertools
import json
import os
import shutil
import socket
import stat
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import nacl.signing
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from shamir_mnemonic.wordlist import WORDLIST

from ledger import signers
from ledger.crypto import RECORD_DOMAIN, SeedSigner, Signer, sha256, sign, verify
from ledger.errors import (
    AgentError,
    BadKeyFile,
    ShareError,
    TokenError,
    UsageError,
    WeakPassphrase,
    WritError,
    WrongPassphrase,
)
from ledger.signers import agent as agent_mod
from ledger.signers import file as file_mod
from tests.fixtures_keys import (
    PIN,
    SOFTHSM_MODULE,
    init_token,
    openssh_key_file,
    requires_softhsm,
    short_tmp,
    ssh_agent,
)

__all__ = ["short_tmp", "ssh_agent"]  # pytest fixtures shared with the CLI tests
from ledger.signers import pkcs11 as p11_mod

SEED = bytes.fromhex("9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60")  # RFC 8032 test 1
OTHER_SEED = bytes(range(1, 33))
PASS = b"correct horse battery staple"
MESSAGE = b"writ/record/v1\n\x93\x01\x02\x03 a record body"


def secret_spellings(seed: bytes) -> list[str]:
    """Every printable way the seed could leak."""
    return [
        seed.hex(),
        seed.hex().upper(),
        base64.b64encode(seed).decode(),
        base64.b64encode(seed).decode().rstrip("="),
        base64.urlsafe_b64encode(seed).decode().rstrip("="),
        repr(seed),
    ]


def assert_no_secret(text: str, seed: bytes = SEED) -> None:
    for spelling in secret_spellings(seed):
        assert spelling not in text


def assert_error_clean(err: BaseException, seed: bytes = SEED) -> None:
    assert isinstance(err, WritError)
    for text in (str(err), repr(err), json.dumps(err.to_json())):
        assert_no_secret(text, seed)


# --- key files ----------------------------------------------------------------


@pytest.fixture
def key_path(tmp_path: Path) -> Path:
    path = tmp_path / "root.key"
    signers.write_key_file(path, SeedSigner(SEED), PASS, cost="interactive", label="root 2024")
    return path


def rewrite(path: Path, text: str | bytes) -> None:
    """Replace a key file's content, keeping mode 0600."""
    path.unlink()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(text.encode() if isinstance(text, str) else text)


def edit(path: Path, change: Callable[[dict[str, Any]], None], *, fix_checksum: bool) -> None:
    doc = json.loads(path.read_text())
    change(doc)
    if fix_checksum:
        doc["checksum"] = file_mod._checksum(doc)
    rewrite(path, json.dumps(doc))


def test_key_file_round_trip_signs_verifiably(key_path: Path) -> None:
    signer = signers.load_key_file(key_path, PASS)
    assert isinstance(signer, Signer)
    assert signer.public_key == SeedSigner(SEED).public_key
    assert signers.read_public_key(key_path) == signer.public_key
    assert signer.label == "root 2024"
    sig = sign(signer, RECORD_DOMAIN, b"body")
    verify(signer.public_key, RECORD_DOMAIN, b"body", sig)
    assert signer.sign(MESSAGE) == SeedSigner(SEED).sign(MESSAGE)


def test_key_file_format_and_mode(key_path: Path) -> None:
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    doc = json.loads(key_path.read_text())
    assert set(doc) == {
        "format",
        "public_key",
        "kdf",
        "opslimit",
        "memlimit",
        "salt",
        "nonce",
        "ciphertext",
        "label",
        "checksum",
    }
    assert doc["format"] == "writ-key/v1"
    assert doc["kdf"] == "argon2id13"
    assert (doc["opslimit"], doc["memlimit"]) == file_mod.COSTS["interactive"]
    assert doc["public_key"] == SeedSigner(SEED).public_key.hex()


def test_key_file_default_cost_is_moderate(tmp_path: Path) -> None:
    path = tmp_path / "k"
    signers.write_key_file(path, SEED, PASS)
    doc = json.loads(path.read_text())
    assert (doc["opslimit"], doc["memlimit"]) == file_mod.COSTS["moderate"]


def test_key_file_wrong_passphrase(key_path: Path) -> None:
    with pytest.raises(WrongPassphrase) as info:
        signers.load_key_file(key_path, b"correct horse battery stapler")
    assert_error_clean(info.value)
    with pytest.raises(WrongPassphrase):
        signers.load_key_file(key_path, b"")


def _flip_hex(value: str) -> str:
    return ("1" if value[0] == "0" else "0") + value[1:]


TAMPERS: list[tuple[str, Callable[[dict[str, Any]], None], bool]] = [
    ("flipped-ciphertext-bit", lambda d: d.update(ciphertext=_flip_hex(d["ciphertext"])), False),
    ("swapped-public-key", lambda d: d.update(public_key=SeedSigner(OTHER_SEED).public_key.hex()), False),
    (
        "swapped-public-key-checksum-recomputed",
        lambda d: d.update(public_key=SeedSigner(OTHER_SEED).public_key.hex()),
        True,
    ),
    ("lowered-opslimit", lambda d: d.update(opslimit=d["opslimit"] - 1), False),
    ("opslimit-zero", lambda d: d.update(opslimit=0), True),
    ("opslimit-absurd", lambda d: d.update(opslimit=2**32 - 1), True),
    ("opslimit-above-sensitive", lambda d: d.update(opslimit=5), True),
    ("memlimit-absurd", lambda d: d.update(memlimit=2**42), True),
    ("memlimit-downgraded", lambda d: d.update(memlimit=8192), True),
    ("opslimit-as-bool", lambda d: d.update(opslimit=True), True),
    ("opslimit-as-string", lambda d: d.update(opslimit="2"), True),
    ("opslimit-as-float", lambda d: d.update(opslimit=2.0), True),
    ("unknown-kdf", lambda d: d.update(kdf="scrypt"), True),
    ("unknown-format", lambda d: d.update(format="writ-key/v2"), True),
    ("extra-field", lambda d: d.update(seed="00" * 32), True),
    ("missing-label", lambda d: d.pop("label"), True),
    ("missing-checksum", lambda d: d.pop("checksum"), False),
    ("short-salt", lambda d: d.update(salt=d["salt"][:-2]), True),
    ("short-nonce", lambda d: d.update(nonce=d["nonce"][:-2]), True),
    ("truncated-ciphertext", lambda d: d.update(ciphertext=d["ciphertext"][:-2]), True),
    (
        "uppercase-hex",
        lambda d: d.update(salt=d["salt"].upper() if d["salt"] != d["salt"].upper() else "AB" * 16),
        True,
    ),
    ("non-hex-nonce", lambda d: d.update(nonce="zz" * 24), True),
    ("label-with-control-char", lambda d: d.update(label="root\x1b[2J"), True),
    ("label-not-string", lambda d: d.update(label=7), True),
    ("edited-label", lambda d: d.update(label="someone else"), False),
    ("edited-checksum", lambda d: d.update(checksum=_flip_hex(d["checksum"])), False),
]


@pytest.mark.parametrize(("name", "change", "fix_checksum"), TAMPERS, ids=[t[0] for t in TAMPERS])
def test_key_file_tampering_is_bad_key_file(
    key_path: Path, name: str, change: Callable[[dict[str, Any]], None], fix_checksum: bool
) -> None:
    edit(key_path, change, fix_checksum=fix_checksum)
    with pytest.raises(BadKeyFile) as info:
        signers.load_key_file(key_path, PASS)
    assert_error_clean(info.value)


def test_key_file_ciphertext_forged_with_checksum_reads_as_wrong_passphrase(key_path: Path) -> None:
    # The checksum is not a MAC: a forger who recomputes it gets past the
    # corruption check, and the SecretBox tag then refuses, as for a wrong passphrase.
    edit(key_path, lambda d: d.update(ciphertext=_flip_hex(d["ciphertext"])), fix_checksum=True)
    with pytest.raises(WrongPassphrase):
        signers.load_key_file(key_path, PASS)


@pytest.mark.parametrize(
    ("name", "content"),
    [
        ("not-json", b"\x00\x01 not json"),
        ("json-array", b"[]"),
        ("not-utf8", b'{"format": "\xff"}'),
        ("empty", b""),
        ("deeply-nested", b"[" * 10_000 + b"]" * 10_000),
        ("oversized", b" " * (file_mod.MAX_FILE_SIZE + 1)),
    ],
)
def test_key_file_garbage_is_bad_key_file(key_path: Path, name: str, content: bytes) -> None:
    rewrite(key_path, content)
    with pytest.raises(BadKeyFile):
        signers.read_public_key(key_path)
    with pytest.raises(BadKeyFile):
        signers.load_key_file(key_path, PASS)


def test_key_file_duplicate_field_is_bad_key_file(key_path: Path) -> None:
    text = key_path.read_text()
    rewrite(key_path, text.replace('"label":', '"label": "x", "label":', 1))
    with pytest.raises(BadKeyFile, match="duplicate"):
        signers.load_key_file(key_path, PASS)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o604, 0o660, 0o602, 0o620], ids=oct)
def test_key_file_readable_by_others_is_refused(key_path: Path, mode: int) -> None:
    key_path.chmod(mode)
    with pytest.raises(BadKeyFile, match="chmod 600") as info:
        signers.load_key_file(key_path, PASS)
    assert str(key_path) in info.value.message
    with pytest.raises(BadKeyFile, match="chmod 600"):
        signers.read_public_key(key_path)
    key_path.chmod(0o400)
    assert signers.load_key_file(key_path, PASS).public_key == SeedSigner(SEED).public_key


def test_key_file_refuses_to_overwrite(key_path: Path) -> None:
    before = key_path.read_bytes()
    with pytest.raises(UsageError, match="overwrite"):
        signers.write_key_file(key_path, OTHER_SEED, PASS, cost="interactive")
    assert key_path.read_bytes() == before


def test_key_file_write_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="empty passphrase"):
        signers.write_key_file(tmp_path / "a", SEED, b"", cost="interactive")
    with pytest.raises(WeakPassphrase, match="at least 8 characters"):  # counted in characters, not bytes
        signers.write_key_file(tmp_path / "a", SEED, "pässwör".encode(), cost="interactive")
    with pytest.raises(UsageError):
        signers.write_key_file(tmp_path / "b", SEED[:31], PASS, cost="interactive")
    with pytest.raises(UsageError):
        signers.write_key_file(tmp_path / "c", SEED, PASS, cost="extreme")  # type: ignore[arg-type]
    with pytest.raises(UsageError):
        signers.write_key_file(tmp_path / "d", SEED, PASS, cost="interactive", label="a\nb")
    with pytest.raises(BadKeyFile):
        signers.write_key_file(tmp_path / "no" / "such" / "dir", SEED, PASS, cost="interactive")
    assert os.listdir(tmp_path) == []


def test_key_file_missing_or_not_a_file(tmp_path: Path) -> None:
    with pytest.raises(BadKeyFile, match="no key file"):
        signers.load_key_file(tmp_path / "absent", PASS)
    (tmp_path / "dir").mkdir(mode=0o700)
    with pytest.raises(BadKeyFile):
        signers.read_public_key(tmp_path / "dir")


def test_key_file_never_contains_or_shows_the_seed(key_path: Path) -> None:
    raw = key_path.read_bytes()
    assert SEED not in raw
    assert_no_secret(raw.decode())
    signer = signers.load_key_file(key_path, PASS)
    assert_no_secret(repr(signer))
    assert_no_secret(str(signer))
    assert SeedSigner(SEED).public_key.hex() in repr(signer)
    for change, fix in [
        (lambda d: d.update(public_key=SeedSigner(OTHER_SEED).public_key.hex()), True),
        (lambda d: d.update(ciphertext=_flip_hex(d["ciphertext"])), False),
    ]:
        edit(key_path, change, fix_checksum=fix)
        with pytest.raises(BadKeyFile) as info:
            signers.load_key_file(key_path, PASS)
        assert_error_clean(info.value)


def test_key_file_reencrypt_under_new_passphrase(key_path: Path, tmp_path: Path) -> None:
    signer = signers.load_key_file(key_path, PASS)
    new = tmp_path / "new.key"
    assert signers.write_key_file(new, signer, b"another one", cost="interactive") == signer.public_key
    assert signers.load_key_file(new, b"another one").public_key == signer.public_key
    assert json.loads(new.read_text())["salt"] != json.loads(key_path.read_text())["salt"]


# --- open_signer --------------------------------------------------------------


def test_open_signer_key_file(key_path: Path) -> None:
    signer = signers.open_signer(key_file=str(key_path), passphrase=PASS)
    assert signer.public_key == SeedSigner(SEED).public_key


@pytest.mark.parametrize(
    ("name", "kwargs"),
    [
        ("no-source", {}),
        ("key-and-agent", {"key_file": "k", "passphrase": PASS, "ssh_agent": "SHA256:x"}),
        ("key-and-token", {"key_file": "k", "passphrase": PASS, "pkcs11_uri": "pkcs11:token=a"}),
        ("all-three", {"key_file": "k", "pkcs11_uri": "pkcs11:", "ssh_agent": "SHA256:x"}),
        ("key-without-passphrase", {"key_file": "k"}),
        ("passphrase-for-token", {"pkcs11_uri": "pkcs11:token=a", "passphrase": PASS}),
        ("pin-for-key-file", {"key_file": "k", "passphrase": PASS, "pin": "1234"}),
        ("module-for-agent", {"ssh_agent": "SHA256:x", "pkcs11_module": "/x.so"}),
    ],
)
def test_open_signer_usage_errors(name: str, kwargs: dict[str, Any]) -> None:
    with pytest.raises(UsageError):
        signers.open_signer(**kwargs)


# --- SLIP-39 shares -----------------------------------------------------------


@pytest.fixture(scope="module")
def shares_2_of_3() -> list[str]:
    return signers.split_secret(SEED, 2, 3)


def test_shares_recover_from_every_pair(shares_2_of_3: list[str]) -> None:
    assert len(shares_2_of_3) == 3
    assert all(len(s.split()) == 33 for s in shares_2_of_3)
    for pair in itertools.permutations(shares_2_of_3, 2):
        assert signers.recover_secret(pair) == SEED
    assert signers.recover_secret(shares_2_of_3) == SEED


def test_shares_recover_successor_checks_digest(shares_2_of_3: list[str]) -> None:
    digest = sha256(SeedSigner(SEED).public_key)
    signer = signers.recover_successor(shares_2_of_3[:2], b"", digest)
    assert signer.public_key == SeedSigner(SEED).public_key


def test_shares_passphrase_protected() -> None:
    shares = signers.split_secret(SEED, 3, 5, passphrase=b"TREZOR")
    digest = sha256(SeedSigner(SEED).public_key)
    assert signers.recover_successor(shares[1:4], b"TREZOR", digest).public_key == SeedSigner(SEED).public_key
    # SLIP-39 silently yields another secret under a wrong passphrase...
    assert signers.recover_secret(shares[:3], b"trezor") != SEED
    # ...which the digest check catches.
    with pytest.raises(ShareError, match="digest") as info:
        signers.recover_successor(shares[:3], b"trezor", digest)
    assert_error_clean(info.value)


def test_shares_too_few(shares_2_of_3: list[str]) -> None:
    with pytest.raises(ShareError, match="too few"):
        signers.recover_secret(shares_2_of_3[:1])
    with pytest.raises(ShareError, match="too few"):  # the same share twice counts once
        signers.recover_secret([shares_2_of_3[0], shares_2_of_3[0]])
    with pytest.raises(ShareError):
        signers.recover_secret([])


def test_shares_mixed_sets(shares_2_of_3: list[str]) -> None:
    other = signers.split_secret(SEED, 2, 3)
    with pytest.raises(ShareError, match="mixed sets"):
        signers.recover_secret([shares_2_of_3[0], other[1]])


def test_shares_bad_checksum_names_no_words(shares_2_of_3: list[str]) -> None:
    words = shares_2_of_3[1].split()
    words[10] = "academic" if words[10] != "academic" else "acid"
    with pytest.raises(ShareError, match="share 2") as info:
        signers.recover_secret([shares_2_of_3[0], " ".join(words)])
    for word in words[4:]:
        assert f" {word} " not in f" {info.value.message} "
    with pytest.raises(ShareError, match="share 1"):
        signers.recover_secret(["not a share at all", shares_2_of_3[0]])


def test_shares_tolerate_case_and_spacing(shares_2_of_3: list[str]) -> None:
    messy = ["  " + shares_2_of_3[0].upper().replace(" ", "   ") + "\n", shares_2_of_3[2]]
    assert signers.recover_secret(messy) == SEED


def test_shares_wrong_digest_length(shares_2_of_3: list[str]) -> None:
    with pytest.raises(UsageError):
        signers.recover_successor(shares_2_of_3, b"", b"\x00" * 31)


def test_shares_split_refusals() -> None:
    with pytest.raises(UsageError):
        signers.split_secret(SEED, 1, 3)
    with pytest.raises(UsageError):
        signers.split_secret(SEED, 4, 3)
    with pytest.raises(UsageError):
        signers.split_secret(SEED[:16], 2, 3)
    with pytest.raises(UsageError):
        signers.split_secret(SEED, 2, 3, passphrase="é".encode())
    one = signers.split_secret(SEED, 1, 1)
    assert signers.recover_secret(one) == SEED


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("2-of-3", (2, 3)),
        ("1-of-1", (1, 1)),
        ("3-of-5", (3, 5)),
        ("16-of-16", (16, 16)),
        ("2-of-16", (2, 16)),
        ("0-of-3", None),
        ("3-of-2", None),
        ("1-of-3", None),
        ("2-of-17", None),
        ("02-of-3", None),
        ("2of3", None),
        ("2/3", None),
        (" 2-of-3", None),
        ("2-of-3\n", None),
        ("-1-of-3", None),
        ("２-of-3", None),
        ("", None),
    ],
)
def test_parse_threshold(text: str, expected: tuple[int, int] | None) -> None:
    if expected is None:
        with pytest.raises(UsageError):
            signers.parse_threshold(text)
    else:
        assert signers.parse_threshold(text) == expected


@settings(max_examples=12, deadline=None)
@given(
    seed=st.binary(min_size=32, max_size=32),
    kn=st.sampled_from([(1, 1), (2, 2), (2, 3), (3, 5), (4, 7)]),
    data=st.data(),
)
def test_shares_any_k_recover(seed: bytes, kn: tuple[int, int], data: st.DataObject) -> None:
    k, n = kn
    shares = signers.split_secret(seed, k, n)
    chosen = data.draw(st.permutations(shares))[:k]
    assert signers.recover_secret(chosen) == seed
    if k > 1:
        with pytest.raises(ShareError, match="too few"):
            signers.recover_secret(chosen[:-1])


WORDS: list[str] = list(WORDLIST)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.one_of(st.text(max_size=60), st.lists(st.sampled_from(WORDS), max_size=40).map(" ".join)),
        max_size=4,
    )
)
def test_shares_garbage_only_share_error(mnemonics: list[str]) -> None:
    with contextlib.suppress(ShareError):
        signers.recover_secret(mnemonics)


def test_share_sheet(shares_2_of_3: list[str]) -> None:
    anchor = SeedSigner(OTHER_SEED).public_key.hex()
    digest = sha256(SeedSigner(SEED).public_key).hex()
    sheet = signers.share_sheet(shares_2_of_3[1], 2, 2, 3, anchor, digest)
    assert "SHARE 2 OF 3" in sheet
    assert "2 of 3" in sheet
    assert anchor in sheet and digest in sheet
    words = shares_2_of_3[1].split()
    for i, word in enumerate(words, start=1):
        assert f"{i:2d}. {word}" in sheet
    assert all(len(line) <= 80 for line in sheet.splitlines())
    assert sheet.isascii()
    with pytest.raises(UsageError):
        signers.share_sheet(shares_2_of_3[1], 4, 2, 3, anchor, digest)
    with pytest.raises(UsageError):
        signers.share_sheet(shares_2_of_3[1], 1, 3, 3, anchor, digest)
    with pytest.raises(UsageError):
        signers.share_sheet(shares_2_of_3[1], 1, 2, 3, anchor.upper(), digest)
    with pytest.raises(ShareError):
        signers.share_sheet("abandon " * 33, 1, 2, 3, anchor, digest)


# --- PKCS#11 (SoftHSM) ----------------------------------------------------------

TOKEN = "writ-test"


@pytest.fixture
def softhsm(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A fresh SoftHSM token ``writ-test`` (user PIN 1234) in its own token directory."""

    yield init_token(tmp_path, monkeypatch, TOKEN)
    assert p11_mod._users == {}, "a PKCS#11 signer or session was left open"


def uri(obj: str | None = None, **extra: str) -> str:
    out = f"pkcs11:token={TOKEN}" + (f";object={obj}" if obj else "")
    if extra:
        out += "?" + "&".join(f"{k}={v}" for k, v in extra.items())
    return out


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_generate_and_sign(softhsm: Path) -> None:
    public = signers.generate_on_token(uri(), PIN, "root")
    with signers.Pkcs11Signer(uri("root"), PIN) as signer:
        assert isinstance(signer, Signer)
        assert signer.public_key == public
        sig = signer.sign(MESSAGE)
        nacl.signing.VerifyKey(public).verify(MESSAGE, sig)
        sig2 = sign(signer, RECORD_DOMAIN, b"body")
        verify(public, RECORD_DOMAIN, b"body", sig2)
        assert PIN not in repr(signer)
    with pytest.raises(TokenError, match="closed"):
        signer.sign(MESSAGE)


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_imported_seed_signs_like_seed_signer(softhsm: Path) -> None:
    public = signers.import_to_token(uri(), PIN, SEED, "successor")
    assert public == SeedSigner(SEED).public_key
    signer = signers.open_signer(pkcs11_uri=uri("successor"), pin=PIN)
    try:
        assert signer.public_key == public
        for msg in (b"", MESSAGE, b"x" * 10_000):
            assert signer.sign(msg) == SeedSigner(SEED).sign(msg)  # Ed25519 is deterministic
    finally:
        assert isinstance(signer, signers.Pkcs11Signer)
        signer.close()


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_imported_key_is_not_extractable(softhsm: Path) -> None:
    import pkcs11

    signers.import_to_token(uri(), PIN, SEED, "successor")
    lib = pkcs11.lib(SOFTHSM_MODULE)
    try:
        with lib.get_token(token_label=TOKEN).open(user_pin=PIN) as session:
            key = session.get_key(object_class=pkcs11.ObjectClass.PRIVATE_KEY, label="successor")
            assert key[pkcs11.Attribute.SENSITIVE] is True
            assert key[pkcs11.Attribute.EXTRACTABLE] is False
            with pytest.raises(pkcs11.exceptions.AttributeSensitive):
                key[pkcs11.Attribute.VALUE]
    finally:
        lib.finalize()


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_select_by_id_and_pin_in_uri(softhsm: Path) -> None:
    signers.import_to_token(uri(), PIN, SEED, "a", key_id=b"\x01")
    signers.import_to_token(uri(), PIN, OTHER_SEED, "b", key_id=b"\x02")
    with signers.Pkcs11Signer(f"pkcs11:token={TOKEN};id=%02?pin-value={PIN}") as signer:
        assert signer.public_key == SeedSigner(OTHER_SEED).public_key
    with signers.Pkcs11Signer(f"pkcs11:token={TOKEN};id=%01;type=private", PIN) as signer:
        assert signer.public_key == SeedSigner(SEED).public_key
    with pytest.raises(TokenError, match="2 objects"):
        signers.Pkcs11Signer(uri(), PIN)


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_wrong_pin(softhsm: Path) -> None:
    signers.generate_on_token(uri(), PIN, "root")
    for bad in ("9999", "123456789"):
        with pytest.raises(TokenError, match="PIN") as info:
            signers.Pkcs11Signer(uri("root"), bad)
        assert bad not in str(info.value) and PIN not in str(info.value)
        assert_error_clean(info.value)
    with pytest.raises(TokenError, match="no PIN"):
        signers.Pkcs11Signer(uri("root"))


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_missing_object_token_and_module(softhsm: Path, tmp_path: Path) -> None:
    with pytest.raises(TokenError, match="no Ed25519 key object=absent"):
        signers.Pkcs11Signer(uri("absent"), PIN)
    with pytest.raises(TokenError, match="no PKCS#11 token"):
        signers.Pkcs11Signer("pkcs11:token=other;object=root", PIN)
    with pytest.raises(TokenError, match="no PKCS#11 module"):
        signers.Pkcs11Signer(uri("root", **{"module-path": str(tmp_path / "nope.so")}), PIN)
    not_a_module = tmp_path / "fake.so"
    not_a_module.write_bytes(b"not an ELF")
    with pytest.raises(TokenError, match="cannot load"):
        signers.Pkcs11Signer(uri("root"), PIN, pkcs11_module=str(not_a_module))


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_label_taken(softhsm: Path) -> None:
    signers.generate_on_token(uri(), PIN, "root")
    with pytest.raises(TokenError, match="already holds"):
        signers.import_to_token(uri(), PIN, SEED, "root")
    with pytest.raises(UsageError):
        signers.generate_on_token(uri("x"), PIN, "y")


@pytest.mark.e2e
@requires_softhsm
def test_pkcs11_unconfigured_softhsm(softhsm: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SOFTHSM2_CONF", str(tmp_path / "missing.conf"))
    with pytest.raises(TokenError, match="SOFTHSM2_CONF"):
        signers.Pkcs11Signer(uri("root"), PIN)


URI_CASES: list[tuple[str, dict[str, Any] | None]] = [
    ("pkcs11:token=writ-test;object=root", {"token": "writ-test", "object": "root"}),
    ("PKCS11:token=a", {"token": "a"}),
    ("pkcs11:", {}),
    ("pkcs11:token=My%20Token;id=%01%02%ff", {"token": "My Token", "id": b"\x01\x02\xff"}),
    ("pkcs11:object=caf%C3%A9", {"object": "café"}),
    ("pkcs11:token=a=b", {"token": "a=b"}),
    ("pkcs11:token=a&b", {"token": "a&b"}),
    (
        "pkcs11:serial=DECC0401648;model=SoftHSM%20v2;manufacturer=SoftHSM%20project",
        {"serial": "DECC0401648", "model": "SoftHSM v2", "manufacturer": "SoftHSM project"},
    ),
    ("pkcs11:slot-id=7;type=private", {"slot_id": 7, "type": "private"}),
    (
        "pkcs11:object=a?module-path=/usr/lib/softhsm/libsofthsm2.so&pin-value=12%2634",
        {"object": "a", "module_path": "/usr/lib/softhsm/libsofthsm2.so", "pin_value": "12&34"},
    ),
    (
        "pkcs11:x-vendor=1;library-manufacturer=SoftHSM",
        {"other": (("x-vendor", "1"), ("library-manufacturer", "SoftHSM"))},
    ),
    ("pkcs12:token=a", None),
    ("token=a", None),
    ("pkcs11:token=a;token=b", None),
    ("pkcs11:tokn=a", None),
    ("pkcs11:token", None),
    ("pkcs11:=a", None),
    ("pkcs11:token=a;", None),
    ("pkcs11:token=a%2", None),
    ("pkcs11:token=a%zz", None),
    ("pkcs11:token=a b", None),
    ("pkcs11:token=a/b", None),
    ("pkcs11:token=%ff", None),
    ("pkcs11:id=", None),
    ("pkcs11:slot-id=x", None),
    ("pkcs11:slot-id=-1", None),
    ("pkcs11:type=secret", None),
    ("pkcs11:token=a?", None),
    ("pkcs11:token=a?pin-source=file:/etc/pin", None),
    ("pkcs11:token=a?module-name=softhsm2", None),
    ("pkcs11:token=a?foo=1", None),
    ("pkcs11:token=a?module-path=/a;b", None),
    ("pkcs11:token=a?module-path=", None),
    ("pkcs11:token=a?pin-value=1&pin-value=2", None),
    ("pkcs11:token=a?token=b", None),
]


@pytest.mark.parametrize(("text", "expected"), URI_CASES)
def test_pkcs11_uri_parser(text: str, expected: dict[str, Any] | None) -> None:
    if expected is None:
        with pytest.raises(UsageError):
            signers.parse_pkcs11_uri(text)
        return
    assert signers.parse_pkcs11_uri(text) == signers.Pkcs11Uri(**expected)


@settings(max_examples=300, deadline=None)
@given(st.text(max_size=80).map(lambda t: "pkcs11:" + t) | st.text(max_size=20))
def test_pkcs11_uri_parser_only_usage_errors(text: str) -> None:
    with contextlib.suppress(UsageError):
        signers.parse_pkcs11_uri(text)


def test_pkcs11_uri_hides_pin_and_round_trips() -> None:
    parsed = signers.parse_pkcs11_uri("pkcs11:token=t?pin-value=s3cr3t-pin")
    assert "s3cr3t-pin" not in repr(parsed) and "s3cr3t-pin" not in str(parsed)
    for typo in (
        "pkcs11:token=t?pin-value:s3cr3t",
        "pkcs11:token=t?pin-value=s3cr3t pin",
        "pkcs11:pin-value=s3cr3t",
    ):
        with pytest.raises(UsageError) as info:
            signers.parse_pkcs11_uri(typo)
        assert "s3cr3t" not in str(info.value)
    text = signers.format_pkcs11_uri(token="my token;x", object="root=1/2", id=b"\x00\xab")
    assert signers.parse_pkcs11_uri(text) == signers.Pkcs11Uri(
        token="my token;x", object="root=1/2", id=b"\x00\xab"
    )


def test_pkcs11_module_resolution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(p11_mod.MODULE_ENV, raising=False)
    bare = signers.parse_pkcs11_uri("pkcs11:token=a")
    with_path = signers.parse_pkcs11_uri("pkcs11:token=a?module-path=/uri.so")
    assert p11_mod.resolve_module(bare) == "/usr/lib/softhsm/libsofthsm2.so"
    assert p11_mod.resolve_module(bare, "/arg.so") == "/arg.so"
    assert p11_mod.resolve_module(with_path) == "/uri.so"
    assert p11_mod.resolve_module(with_path, "/uri.so") == "/uri.so"
    with pytest.raises(UsageError):
        p11_mod.resolve_module(with_path, "/arg.so")
    monkeypatch.setenv(p11_mod.MODULE_ENV, "/env.so")
    assert p11_mod.resolve_module(bare) == "/env.so"
    assert p11_mod.resolve_module(bare, "/arg.so") == "/arg.so"


@pytest.mark.parametrize(
    ("name", "point", "ok"),
    [
        ("der-octet-string", b"\x04\x20" + bytes(range(32)), True),
        ("raw", bytes(range(32)), True),
        ("wrong-der-length", b"\x04\x1f" + bytes(range(32)), False),
        ("wrong-der-tag", b"\x03\x20" + bytes(range(32)), False),
        ("short", bytes(31), False),
        ("ed448-size", b"\x04\x39" + bytes(57), False),
        ("empty", b"", False),
    ],
)
def test_pkcs11_ec_point_decoding(name: str, point: bytes, ok: bool) -> None:
    if ok:
        assert p11_mod._point_to_public_key(point) == bytes(range(32))
    else:
        with pytest.raises(TokenError):
            p11_mod._point_to_public_key(point)


# --- ssh-agent --------------------------------------------------------------------

requires_openssh = pytest.mark.skipif(
    any(shutil.which(tool) is None for tool in ("ssh-agent", "ssh-add", "ssh-keygen")),
    reason="openssh-client is not installed (apt-get install openssh-client)",
)


def ssh_add(sock: str, *args: str) -> None:
    subprocess.run(
        ["ssh-add", *args],
        env={**os.environ, "SSH_AUTH_SOCK": sock},
        check=True,
        capture_output=True,
        stdin=subprocess.DEVNULL,
        timeout=30,
    )


@pytest.mark.e2e
@requires_openssh
def test_agent_list_sign_verify(ssh_agent: str, short_tmp: Path) -> None:
    key = openssh_key_file(short_tmp, SEED)
    ssh_add(ssh_agent, str(key))
    listed = signers.list_agent_keys(ssh_agent)
    public = SeedSigner(SEED).public_key
    assert [(fp, pub) for fp, pub, _ in listed] == [(signers.fingerprint(public), public)]
    keygen = subprocess.run(
        ["ssh-keygen", "-lf", str(key)], check=True, capture_output=True, text=True, timeout=30
    )
    assert keygen.stdout.split()[1] == signers.fingerprint(public)

    signer = signers.AgentSigner(signers.fingerprint(public), ssh_agent)
    assert isinstance(signer, Signer)
    assert signer.public_key == public
    sig = signer.sign(MESSAGE)
    nacl.signing.VerifyKey(public).verify(MESSAGE, sig)
    assert sig == SeedSigner(SEED).sign(MESSAGE)
    verify(public, RECORD_DOMAIN, b"body", sign(signer, RECORD_DOMAIN, b"body"))
    # the hex public key names the same key
    assert signers.AgentSigner(public.hex(), ssh_agent).public_key == public


@pytest.mark.e2e
@requires_openssh
def test_agent_via_open_signer_and_env(
    ssh_agent: str, short_tmp: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ssh_add(ssh_agent, str(openssh_key_file(short_tmp, SEED)))
    ssh_add(ssh_agent, str(openssh_key_file(short_tmp, OTHER_SEED, "second")))
    monkeypatch.setenv("SSH_AUTH_SOCK", ssh_agent)
    assert len(signers.list_agent_keys()) == 2
    signer = signers.open_signer(ssh_agent=signers.fingerprint(SeedSigner(OTHER_SEED).public_key))
    assert signer.sign(MESSAGE) == SeedSigner(OTHER_SEED).sign(MESSAGE)


@pytest.mark.e2e
@requires_openssh
def test_agent_key_not_loaded_or_removed(ssh_agent: str, short_tmp: Path) -> None:
    key = openssh_key_file(short_tmp, SEED)
    ssh_add(ssh_agent, str(key))
    other = signers.fingerprint(SeedSigner(OTHER_SEED).public_key)
    with pytest.raises(AgentError, match="not loaded"):
        signers.AgentSigner(other, ssh_agent)
    with pytest.raises(AgentError, match="not loaded"):
        signers.AgentSigner(SeedSigner(OTHER_SEED).public_key.hex(), ssh_agent)
    signer = signers.AgentSigner(signers.fingerprint(SeedSigner(SEED).public_key), ssh_agent)
    ssh_add(ssh_agent, "-D")
    with pytest.raises(AgentError, match="refused"):
        signer.sign(MESSAGE)


def test_agent_no_agent(short_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fp = signers.fingerprint(SeedSigner(SEED).public_key)
    monkeypatch.delenv("SSH_AUTH_SOCK", raising=False)
    with pytest.raises(AgentError, match="SSH_AUTH_SOCK"):
        signers.AgentSigner(fp)
    with pytest.raises(AgentError, match="SSH_AUTH_SOCK"):
        signers.list_agent_keys()
    with pytest.raises(AgentError, match="no ssh-agent"):
        signers.AgentSigner(fp, str(short_tmp / "absent.sock"))
    # a socket file nobody listens on
    dead = short_tmp / "dead.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.bind(str(dead))
    with pytest.raises(AgentError):
        signers.AgentSigner(fp, str(dead))


@pytest.mark.parametrize(
    "bad", ["SHA256:short", "MD5:aa:bb", "sha256:" + "A" * 43, "00" * 31, "", "SHA256:" + "!" * 43]
)
def test_agent_bad_fingerprint_is_usage_error(bad: str) -> None:
    with pytest.raises(UsageError):
        signers.AgentSigner(bad, "/nonexistent")


def test_agent_fingerprint_matches_openssh_algorithm() -> None:
    public = SeedSigner(SEED).public_key
    blob = struct.pack(">I", 11) + b"ssh-ed25519" + struct.pack(">I", 32) + public
    expected = "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=")
    assert signers.fingerprint(public) == expected


# A scripted agent for replies a real one would not send.


def _frame(payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + payload


def _s(data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + data


def _identities_answer(*publics: bytes) -> bytes:
    body = b"".join(_s(agent_mod.key_blob(p)) + _s(b"comment") for p in publics)
    return bytes([12]) + struct.pack(">I", len(publics)) + body


@contextlib.contextmanager
def fake_agent(directory: Path, handler: Callable[[int, bytes], bytes | None]) -> Iterator[str]:
    """Serve ``handler(request type, payload) -> raw reply bytes`` (None: hang up) on a unix socket."""

    path = str(directory / "fake.sock")
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(path)
    server.listen(4)
    server.settimeout(0.1)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            with conn:
                conn.settimeout(5)
                try:
                    (n,) = struct.unpack(">I", conn.recv(4, socket.MSG_WAITALL))
                    req = conn.recv(n, socket.MSG_WAITALL)
                    reply = handler(req[0], req[1:])
                    if reply is not None:
                        conn.sendall(reply)
                except OSError:
                    pass

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield path
    finally:
        stop.set()
        thread.join(timeout=5)
        server.close()


PUB = SeedSigner(SEED).public_key


def _sign_reply(signature_blob: bytes) -> bytes:
    return _frame(bytes([14]) + _s(signature_blob))


def _good_sig(message: bytes) -> bytes:
    return SeedSigner(SEED).sign(message)


def _message_of(payload: bytes) -> bytes:
    (n,) = struct.unpack_from(">I", payload, 0)
    (m,) = struct.unpack_from(">I", payload, 4 + n)
    return payload[8 + n : 8 + n + m]


LYING_AGENTS: list[tuple[str, Callable[[bytes], bytes | None], str]] = [
    (
        "signature-by-another-key",
        lambda p: _sign_reply(_s(b"ssh-ed25519") + _s(SeedSigner(OTHER_SEED).sign(_message_of(p)))),
        "does not verify",
    ),
    (
        "signature-of-other-data",
        lambda p: _sign_reply(_s(b"ssh-ed25519") + _s(_good_sig(b"other"))),
        "does not verify",
    ),
    (
        "rsa-signature-type",
        lambda p: _sign_reply(_s(b"rsa-sha2-256") + _s(_good_sig(_message_of(p)))),
        "not ssh-ed25519",
    ),
    ("short-signature", lambda p: _sign_reply(_s(b"ssh-ed25519") + _s(bytes(63))), "64 bytes"),
    (
        "trailing-bytes",
        lambda p: _sign_reply(_s(b"ssh-ed25519") + _s(_good_sig(_message_of(p))) + b"x"),
        "trailing",
    ),
    ("truncated-blob", lambda p: _frame(bytes([14]) + struct.pack(">I", 99) + b"abc"), "truncated"),
    ("failure", lambda p: _frame(bytes([5])), "refused"),
    ("wrong-reply-type", lambda p: _frame(bytes([12]) + struct.pack(">I", 0)), "unexpected"),
    ("oversized-length", lambda p: struct.pack(">I", 10**9), "bytes"),
    ("zero-length", lambda p: struct.pack(">I", 0), "bytes"),
    ("hang-up", lambda p: None, "closed"),
    ("half-reply", lambda p: struct.pack(">I", 100) + b"\x0e", "closed"),
]


@pytest.mark.parametrize(("name", "reply", "match"), LYING_AGENTS, ids=[c[0] for c in LYING_AGENTS])
def test_agent_lying_or_broken_agent(
    short_tmp: Path, name: str, reply: Callable[[bytes], bytes | None], match: str
) -> None:
    def handler(kind: int, payload: bytes) -> bytes | None:
        if kind == 11:
            return _frame(_identities_answer(PUB))
        return reply(payload)

    with fake_agent(short_tmp, handler) as path:
        signer = signers.AgentSigner(signers.fingerprint(PUB), path)
        with pytest.raises(AgentError, match=match):
            signer.sign(MESSAGE)


def test_agent_honest_fake_agent_and_non_ed25519_keys(short_tmp: Path) -> None:
    rsa_blob = _s(b"ssh-rsa") + _s(b"\x01\x00\x01") + _s(b"\x00" + bytes(256))

    def handler(kind: int, payload: bytes) -> bytes | None:
        if kind == 11:
            ed = _s(agent_mod.key_blob(PUB)) + _s(b"me@host")
            return _frame(bytes([12]) + struct.pack(">I", 2) + _s(rsa_blob) + _s(b"rsa") + ed)
        return _sign_reply(_s(b"ssh-ed25519") + _s(_good_sig(_message_of(payload))))

    with fake_agent(short_tmp, handler) as path:
        assert signers.list_agent_keys(path) == [(signers.fingerprint(PUB), PUB, "me@host")]
        assert signers.AgentSigner(signers.fingerprint(PUB), path).sign(MESSAGE) == _good_sig(MESSAGE)
        rsa_fp = "SHA256:" + base64.b64encode(hashlib.sha256(rsa_blob).digest()).decode().rstrip("=")
        with pytest.raises(AgentError, match="not an ssh-ed25519"):
            signers.AgentSigner(rsa_fp, path)


@pytest.mark.parametrize(
    ("name", "answer"),
    [
        ("failure", _frame(bytes([5]))),
        ("truncated-list", _frame(bytes([12]) + struct.pack(">I", 3) + _s(b"x"))),
        ("absurd-count", _frame(bytes([12]) + struct.pack(">I", 2**31))),
        ("trailing-bytes", _frame(_identities_answer(PUB) + b"\x00")),
        ("sign-response-to-listing", _frame(bytes([14]) + _s(b""))),
    ],
)
def test_agent_broken_listing(short_tmp: Path, name: str, answer: bytes) -> None:
    with fake_agent(short_tmp, lambda kind, payload: answer) as path:
        with pytest.raises(AgentError):
            signers.list_agent_keys(path)
        with pytest.raises(AgentError):
            signers.AgentSigner(signers.fingerprint(PUB), path)


def test_agent_timeout(short_tmp: Path) -> None:
    release = threading.Event()

    def handler(kind: int, payload: bytes) -> bytes | None:
        release.wait(5)
        return None

    with fake_agent(short_tmp, handler) as path:
        started = time.monotonic()
        with pytest.raises(AgentError, match="did not answer"):
            signers.list_agent_keys(path, timeout=0.2)
        assert time.monotonic() - started < 3
        release.set()
