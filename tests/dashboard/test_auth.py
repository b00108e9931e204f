"""Local accounts, password hashes, CLI and OIDC identities."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from rollout import auth
from rollout.auth import AccountsConfigError, Identity, PermissionDenied
from tests.fixtures.accounts import cheap_hash


@pytest.fixture(scope="module")
def hashes() -> dict[str, str]:
    return {"alice": cheap_hash("alice-pw"), "bob": cheap_hash("bob-pw")}


def test_hash_is_salted_and_verifies() -> None:
    h1, h2 = auth.hash_password("same"), auth.hash_password("same")  # the product's cost, not the tests'
    assert h1 != h2  # per-user random salt
    assert h1.startswith("scrypt$131072$8$1$")  # OWASP's minimum for scrypt
    assert ":" not in h1 and ";" not in h1
    assert auth.verify_password("same", h1) and auth.verify_password("same", h2)
    assert not auth.verify_password("Same", h1)
    assert not auth.verify_password("same", "scrypt$garbage")
    assert "same" not in h1


def test_a_cost_given_is_recorded_in_the_hash_and_read_back_by_the_check() -> None:
    """The tests' accounts are hashed at n=2**10 (tests/fixtures/accounts.py): real scrypt, verified the
    same way; n must be a power of two, as scrypt asks."""
    salt = b"sixteen byte salt"[:16]
    h = auth.hash_password("cheap-pw", salt=salt, n=2**10)
    digest = hashlib.scrypt(b"cheap-pw", salt=salt, n=2**10, r=8, p=1, dklen=32)  # scrypt's, at that n
    assert h == f"scrypt$1024$8$1${auth._b64(salt)}${auth._b64(digest)}"
    assert auth.verify_password("cheap-pw", h) and not auth.verify_password("cheap-pW", h)
    with pytest.raises(ValueError, match="power of 2"):
        auth.hash_password("cheap-pw", n=1000)


def test_empty_password_refused() -> None:
    with pytest.raises(ValueError, match="empty"):
        auth.hash_password("")


def test_accounts_from_env_and_authenticate(hashes: dict[str, str]) -> None:
    env = {"SPARSEPILOT_ACCOUNTS": f"alice:approver:{hashes['alice']}; bob:viewer:{hashes['bob']};"}
    accounts = auth.load_accounts(env)
    assert {a.name: a.role for a in accounts.values()} == {"alice": "approver", "bob": "viewer"}
    assert hashes["alice"] not in repr(accounts["alice"])
    assert auth.authenticate("alice", "alice-pw", accounts) == Identity("alice", "approver", "local-account")
    assert auth.authenticate("bob", "bob-pw", accounts) == Identity("bob", "viewer", "local-account")
    assert auth.authenticate("alice", "bob-pw", accounts) is None
    assert auth.authenticate("mallory", "alice-pw", accounts) is None


def test_an_unknown_name_costs_the_scrypt_work_of_a_wrong_password(
    hashes: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Review s48: the unknown name's check ran at the product's n=2**17 whatever the accounts' hashes
    asked, so an installation whose hashes use another n (here the tests' 2**10) answered an unknown
    name in another time than a known one. Now both run scrypt at the parameters the accounts use:
    the parameters every scrypt call of a sign-in asked for are compared, not times."""
    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']};bob:viewer:{hashes['bob']}")
    asked: list[tuple[int, int, int, int]] = []
    real = hashlib.scrypt

    def scrypt(password: bytes, **kw: int) -> bytes:  # the real scrypt, its parameters noted
        asked.append((kw["n"], kw["r"], kw["p"], kw["dklen"]))
        return real(password, **kw)

    monkeypatch.setattr(hashlib, "scrypt", scrypt)
    for name in ("alice", "mallory", "Alice", " bob-pw "):
        asked.clear()
        assert auth.authenticate(name, "bob-pw", accounts) is None
        assert asked[-1:] == [(2**10, 8, 1, 32)], name  # the check itself at the accounts' cost


def test_the_usual_cost_is_the_one_most_hashes_use() -> None:
    """Which parameters an unknown name is checked at (pure): most hashes', the dearer of two as
    common, the product's default where no hash parses."""
    salt = b"0123456789abcdef"
    h10, h11 = (auth.hash_password("pw", salt=salt, n=n) for n in (2**10, 2**11))
    assert auth.usual_cost([h10, h11, h10]) == (2**10, 8, 1, 32)
    assert auth.usual_cost([h10, h11]) == (2**11, 8, 1, 32)
    assert auth.usual_cost([]) == auth.usual_cost(["scrypt$garbage"]) == (2**17, 8, 1, 32)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("alice:approver", r"entry 1: expected name:role:password_hash"),
        ("alice:admin:scrypt$16384$8$1$AAAA$BBBB", r"entry 1 \(alice\): role 'admin'"),
        ("alice:viewer:plaintext", r"entry 1 \(alice\): password_hash"),
        (":viewer:scrypt$16384$8$1$AAAA$BBBB", r"entry 1: account name is empty"),
    ],
)
def test_malformed_accounts_name_the_entry(text: str, message: str) -> None:
    with pytest.raises(AccountsConfigError, match=message):
        auth.parse_accounts(text)


_HF = "hf_AbCdEfGhIjKlMnOpQrStUvWxYz01234567"


@pytest.mark.parametrize("name", [_HF, "password=hunter2", "ghp_" + "aB3" * 12])
def test_an_account_name_that_holds_a_secret_is_refused(name: str, tmp_path: Path) -> None:
    """An account's name is every audit row's actor it signs, kept as given for good: a token pasted as a
    name was accepted (fix-s). Refused, naming the entry and the field, the secret not repeated."""
    with pytest.raises(AccountsConfigError, match=r"entry 1: account name '.*\*\*\*' holds") as env:
        auth.parse_accounts(f"{name}:viewer:scrypt$16384$8$1$AAAA$BBBB")
    with pytest.raises(AccountsConfigError, match=r"accounts\..*\*\*\*: account name") as toml:
        auth.load_accounts_file(_toml(tmp_path, f'"{name}"', "scrypt$16384$8$1$AAAA$BBBB"))
    assert name not in str(env.value) + str(toml.value)


def test_duplicate_account_refused(hashes: dict[str, str]) -> None:
    with pytest.raises(AccountsConfigError, match="entry 2: account 'alice' is defined twice"):
        auth.parse_accounts(f"alice:viewer:{hashes['alice']};alice:approver:{hashes['alice']}")


def test_accounts_file(tmp_path: Path, hashes: dict[str, str]) -> None:
    f = tmp_path / "accounts.toml"
    f.write_text(f'[accounts.carol]\nrole = "approver"\npassword_hash = "{hashes["alice"]}"\n')
    accounts = auth.load_accounts({"SPARSEPILOT_ACCOUNTS_FILE": str(f)})
    assert accounts["carol"].role == "approver"
    f.write_text('[accounts.carol]\nrole = "approver"\n')
    with pytest.raises(AccountsConfigError, match=r"accounts\.carol: password_hash is missing"):
        auth.load_accounts({"SPARSEPILOT_ACCOUNTS_FILE": str(f)})
    with pytest.raises(AccountsConfigError, match="does not exist"):
        auth.load_accounts({"SPARSEPILOT_ACCOUNTS_FILE": str(tmp_path / "nope.toml")})


def test_cli_needs_the_password_and_the_role_comes_from_the_account(hashes: dict[str, str], sp_home) -> None:  # noqa: ANN001
    accounts = f"alice:approver:{hashes['alice']};bob:viewer:{hashes['bob']}"
    env = {"SPARSEPILOT_ACCOUNTS": accounts, "SPARSEPILOT_HOME": "/nonexistent-home"}
    env["SPARSEPILOT_TOKEN_FILE"] = "/nonexistent-home/token"
    with pytest.raises(PermissionDenied, match="nobody is signed in"):
        auth.cli_authenticate(env={**env, "SPARSEPILOT_USER": "alice"})  # naming an account is not enough
    bob = auth.cli_authenticate(password="bob-pw", env={**env, "SPARSEPILOT_USER": "bob"})
    assert bob == Identity("bob", "viewer", "cli-password")
    with pytest.raises(PermissionDenied, match="bob"):
        auth.require_approver(bob, "promote")
    with pytest.raises(PermissionDenied, match="^wrong account name or password$"):
        auth.cli_authenticate(password="bob-pw", env={**env, "SPARSEPILOT_USER": "alice"})
    with pytest.raises(PermissionDenied, match="^wrong account name or password$"):
        auth.cli_authenticate(password="x", env={**env, "SPARSEPILOT_USER": "eve"})
    prompted = auth.cli_authenticate(prompt=lambda _: "alice-pw", env={**env, "SPARSEPILOT_USER": "alice"})
    assert prompted.role == "approver"


def test_the_lockout_rule_counts_recent_failures() -> None:
    """Five failures less than 30 s old lock the name until the oldest of the last five is 30 s old;
    older failures, and successes (never recorded), change nothing."""
    assert auth.locked_until([], 100.0) is None
    assert auth.locked_until([96.0, 97.0, 98.0, 99.0], 100.0) is None
    assert auth.locked_until([91.0, 96.0, 97.0, 98.0, 99.0], 100.0) == 121.0
    assert auth.locked_until([60.0, 70.0, 96.0, 97.0, 98.0, 99.0], 100.0) is None  # two are old
    assert auth.locked_until([91.0, 92.0, 96.0, 97.0, 98.0, 99.0], 100.0) == 122.0  # six: 2nd oldest
    assert auth.locked_until([91.0, 96.0, 97.0, 98.0, 99.0], 121.0) is None
    assert auth.locked_until([91.0, 96.0, 97.0, 98.0, 130.0], 100.0) == 121.0  # a clock ahead counts
    assert str(auth.TooManyAttempts(20.6)) == "too many failed sign-ins; try again in 21 s"


def test_sign_in_counts_failures_per_name_in_the_state_db(
    hashes: dict[str, str],
    sp_home,
    monkeypatch: pytest.MonkeyPatch,  # noqa: ANN001
) -> None:
    """Review J finding 5: the count lived in one browser session. Now: per name, in the state DB; the
    lock refuses before any scrypt work; a success erases nothing; the row never holds the password."""
    from sqlalchemy import select

    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']}")
    t = 1_000_000.0 + __import__("time").time()  # any time: the rows' own stamps are compared
    for i in range(4):
        assert auth.sign_in("alice", f"guess-{i}", via="test", accounts=accounts) is None
    assert auth.sign_in("alice", "alice-pw", via="test", accounts=accounts).role == "approver"
    assert auth.sign_in("alice", "guess-4", via="test", accounts=accounts) is None  # 5th failure
    checks: list[str] = []
    real = auth.verify_password
    monkeypatch.setattr(auth, "verify_password", lambda pw, h: checks.append(pw) or real(pw, h))
    with pytest.raises(auth.TooManyAttempts, match="too many failed sign-ins; try again in"):
        auth.sign_in("alice", "alice-pw", via="test", accounts=accounts)  # the success did not reset
    assert checks == []  # refused before the password work
    assert auth.sign_in("alice", "alice-pw", via="test", accounts=accounts, now=t) is not None  # later
    assert auth.sign_in("mallory", "x", via="test", accounts=accounts) is None  # another name: its own
    with session_scope() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.action == "auth.sign_in_failed")).all()
        assert [(r.entity_id, r.details.get("account")) for r in rows][:5] == [("alice", "alice")] * 5
        assert rows[5].entity_id.startswith("unknown:") and "mallory" not in str(rows[5].details)
        assert {r.actor for r in rows} == {"anonymous"} and rows[0].details["via"] == "test"
        for r in rows:
            assert not any(f"guess-{i}" in str(v) for i in range(5) for v in (r.details, r.entity_id))


def test_a_password_typed_as_an_unknown_name_is_never_stored(hashes: dict[str, str], sp_home) -> None:  # noqa: ANN001
    """Review s46 A1: a password typed into the name field (or the two fields swapped) was written in
    clear into the append-only audit log (entity_id and details), which anonymous visitors read. Now an
    unknown name is kept only as a keyed digest; the per-name limit still holds on it; a configured
    account's failures still name it."""
    from sqlalchemy import select

    from rollout import queries
    from rollout.db.models import AuditEntry
    from rollout.db.session import session_scope

    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']};bob:viewer:{hashes['bob']}")
    secret = "not-an-account-S3cret"
    for _ in range(auth.MAX_FAILURES):
        assert auth.sign_in(secret, "alice-pw", via="test", accounts=accounts) is None
    with pytest.raises(auth.TooManyAttempts):  # the same unknown name is still counted, and locked
        auth.sign_in(secret, "alice-pw", via="test", accounts=accounts)
    assert auth.sign_in(" another-S3cret ", "x", via="test", accounts=accounts) is None  # its own count
    assert auth.sign_in("bob", "wrong", via="cli", accounts=accounts) is None
    with session_scope() as s:
        rows = s.scalars(select(AuditEntry).where(AuditEntry.action == "auth.sign_in_failed")).all()
        shown = repr(queries.audit_entries(s))
    assert "S3cret" not in shown and not any("S3cret" in f"{r.entity_id} {r.details}" for r in rows)
    unknown = [r.entity_id for r in rows[: auth.MAX_FAILURES]]
    assert len(set(unknown)) == 1 and unknown[0].startswith("unknown:") and len(unknown[0]) <= 64
    assert rows[0].details == {"account_known": False, "via": "test"}
    assert rows[auth.MAX_FAILURES].entity_id not in unknown  # another unknown name, another digest
    assert (rows[-1].entity_id, rows[-1].details) == ("bob", {"account": "bob", "via": "cli"})
    # keyed: another installation (other accounts) gives the same name another digest
    other = auth.parse_accounts(f"carol:viewer:{hashes['alice']}")
    assert auth._account_key(secret, accounts) == unknown[0] != auth._account_key(secret, other)


def test_sign_in_without_a_state_db_is_refused_by_name(
    hashes: dict[str, str], tmp_path: Path, monkeypatch
) -> None:  # noqa: ANN001
    monkeypatch.setenv("SPARSEPILOT_HOME", str(tmp_path / "no-schema"))
    monkeypatch.delenv("SPARSEPILOT_DATABASE_URL", raising=False)
    (tmp_path / "no-schema").mkdir()
    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']}")
    with pytest.raises(auth.SignInUnavailable, match="counts failed sign-ins, cannot be used"):
        auth.sign_in("alice", "alice-pw", via="test", accounts=accounts)


def test_roles_are_ordered() -> None:
    op = Identity("olga", "operator", "cli-password")
    assert auth.require_role(op, "operator", "import") is op
    assert auth.require_role(Identity("a", "approver", "x"), "operator", "import").name == "a"
    with pytest.raises(PermissionDenied, match="needs the operator role; 'v' is a viewer"):
        auth.require_role(Identity("v", "viewer", "x"), "operator", "import")
    with pytest.raises(PermissionDenied, match="needs the approver role; 'olga' is an operator"):
        auth.require_approver(op, "promote")


def test_login_token_expires_is_signed_and_tracks_the_account(tmp_path: Path, hashes: dict[str, str]) -> None:
    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']};bob:viewer:{hashes['bob']}")
    key = b"k" * 32
    alice = auth.authenticate("alice", "alice-pw", accounts)
    tok = auth.issue_token(alice, key, ttl_s=3600, now=1000.0)
    assert auth.verify_token(tok, key, accounts, now=2000.0) == Identity("alice", "approver", "cli-token")
    with pytest.raises(PermissionDenied, match="expired"):
        auth.verify_token(tok, key, accounts, now=1000.0 + 3600)
    with pytest.raises(PermissionDenied, match="not valid for this installation"):
        auth.verify_token(tok, b"other-key", accounts, now=2000.0)
    head, payload, mac = tok.split(".")
    forged = payload[:-2] + ("AA" if payload[-2:] != "AA" else "BB")
    with pytest.raises(PermissionDenied, match="not valid"):
        auth.verify_token(f"{head}.{forged}.{mac}", key, accounts, now=2000.0)
    demoted = {"alice": auth.Account("alice", "viewer", hashes["alice"])}
    assert auth.verify_token(tok, key, demoted, now=2000.0).role == "viewer"
    with pytest.raises(PermissionDenied, match="no longer exists"):
        auth.verify_token(tok, key, {}, now=2000.0)
    # through cli_authenticate: the token file, and a SPARSEPILOT_USER that disagrees with it
    env = {
        "SPARSEPILOT_ACCOUNTS": f"alice:approver:{hashes['alice']}",
        "SPARSEPILOT_HOME": str(tmp_path),
        "SPARSEPILOT_TOKEN_FILE": str(tmp_path / "cfg" / "token"),
    }
    real_key = auth.auth_key(env, create=True)
    assert (tmp_path / "auth.key").stat().st_mode & 0o777 == 0o600
    auth.write_private(tmp_path / "cfg" / "token", auth.issue_token(alice, real_key).encode())
    assert (tmp_path / "cfg" / "token").stat().st_mode & 0o777 == 0o600
    assert auth.cli_authenticate(env=env) == Identity("alice", "approver", "cli-token")
    with pytest.raises(PermissionDenied, match="login token belongs to 'alice'"):
        auth.cli_authenticate(env={**env, "SPARSEPILOT_USER": "bob"})


def test_hash_parameters_are_bounded() -> None:
    huge = "scrypt$1073741824$8$1$AAAAAAAAAAAAAAAAAAAAAA$BBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBBB"
    with pytest.raises(AccountsConfigError, match="MiB of scrypt memory"):
        auth.parse_accounts(f"alice:approver:{huge}")
    assert auth.verify_password("x", huge) is False  # and sign-in never tries it


def test_first_run_account_only_on_embedded_defaults(tmp_path: Path) -> None:
    env = {"SPARSEPILOT_HOME": str(tmp_path)}
    assert auth.create_first_run_account({**env, "SPARSEPILOT_DATABASE_URL": "postgresql://x/y"}) is None
    name, password = auth.create_first_run_account(env)
    f = tmp_path / "accounts.toml"
    assert f.stat().st_mode & 0o777 == 0o600 and password not in f.read_text()
    assert auth.authenticate(name, password, auth.load_accounts(env)).role == "approver"
    assert auth.create_first_run_account(env) is None  # printed once, never again


def test_oidc_roles_from_the_approver_list() -> None:
    claims = {"is_logged_in": True, "email": "Ann@Example.com", "email_verified": True, "sub": "123"}
    assert auth.identity_from_oidc(claims, ["ann@example.com"]) == Identity(
        "oidc:Ann@Example.com", "approver", "oidc"
    )
    assert auth.identity_from_oidc(claims, []).role == "viewer"
    assert auth.identity_from_oidc({"is_logged_in": False}, ["x"]) is None


ISS = "https://idp.example.com"


@pytest.mark.parametrize(
    "claims",
    [
        # preferred_username is chosen by the user on many providers (OIDC Core: not unique)
        {"preferred_username": "ann@example.com", "sub": "attacker-77", "iss": ISS},
        # an email the provider does not vouch for (self-registration)
        {"email": "ann@example.com", "email_verified": False, "sub": "attacker-78", "iss": ISS},
        {"email": "ann@example.com", "email_verified": "false", "sub": "attacker-79", "iss": ISS},
        {"email": "ann@example.com", "sub": "attacker-80", "iss": ISS},  # no email_verified claim at all
        # a bare subject is unique only within its issuer: listed subjects carry it ("<issuer>#<subject>")
        {"sub": "ann-sub", "iss": "https://other-idp.example.org"},
        {"sub": "ann-sub"},
    ],
)
def test_oidc_approver_only_on_claims_the_provider_vouches_for(claims: dict[str, object]) -> None:
    """Review J finding 3: the approver role came from an unverified email or from preferred_username."""
    listed = ["ann@example.com", "ann-sub", f"{ISS}#ann-sub"]
    who = auth.identity_from_oidc({"is_logged_in": True, **claims}, listed)
    assert who is not None and who.role == "viewer"
    assert who.name != "ann@example.com" and who.name.startswith("oidc:")


def test_oidc_approver_by_verified_email_or_issuer_and_subject() -> None:
    verified = {"email": "ann@example.com", "email_verified": True, "sub": "x", "iss": ISS}
    assert auth.identity_from_oidc(verified, ["Ann@Example.com"]).role == "approver"
    as_string = {**verified, "email_verified": "true"}  # some providers send a JSON string
    assert auth.identity_from_oidc(as_string, ["ann@example.com"]).role == "approver"
    by_subject = {"sub": "ann-sub", "iss": ISS, "email": "ann@example.com"}  # email not verified
    who = auth.identity_from_oidc(by_subject, [f"{ISS}#ann-sub"])
    assert who == Identity(f"oidc:{ISS}#ann-sub", "approver", "oidc")
    assert auth.identity_from_oidc({"preferred_username": "ann", "email": "a@b.c"}, ["ann"]) is None


def test_an_oidc_user_never_takes_a_local_accounts_name(hashes: dict[str, str], tmp_path: Path) -> None:
    """An OIDC user whose preferred_username (or email) equals a local account's name was recorded under
    that name: their signatures were indistinguishable. OIDC names are namespaced, and a local account
    cannot take the namespace."""
    who = auth.identity_from_oidc({"preferred_username": "carol", "sub": "attacker-79", "iss": ISS})
    assert who is not None and who.name == f"oidc:{ISS}#attacker-79" and who.role == "viewer"
    mail = auth.identity_from_oidc({"email": "carol@x.org", "email_verified": True, "sub": "c"})
    assert mail is not None and mail.name == "oidc:carol@x.org"
    with pytest.raises(AccountsConfigError, match="kept for single sign-on users"):
        auth.load_accounts_file(_toml(tmp_path, '"oidc:carol@x.org"', hashes["alice"]))
    with pytest.raises(AccountsConfigError, match="kept for single sign-on users"):
        auth.load_accounts_file(_toml(tmp_path, '"OIDC:carol@x.org"', hashes["alice"]))


def test_local_accounts_may_declare_an_email_and_old_entries_still_load(
    hashes: dict[str, str], tmp_path: Path
) -> None:
    env = f"alice:approver:{hashes['alice']}:Alice@Corp.example;bob:viewer:{hashes['bob']}"
    accounts = auth.parse_accounts(env)
    assert accounts["alice"].email == "Alice@Corp.example" and accounts["bob"].email == ""
    f = _toml(tmp_path, "carol", hashes["alice"], 'email = "carol@corp.example"\n')
    assert auth.load_accounts_file(f)["carol"].email == "carol@corp.example"
    assert auth.load_accounts_file(_toml(tmp_path, "carol", hashes["alice"]))["carol"].email == ""
    with pytest.raises(AccountsConfigError, match=r"entry 1 \(alice\): email 'not-an-email'"):
        auth.parse_accounts(f"alice:approver:{hashes['alice']}:not-an-email")
    with pytest.raises(AccountsConfigError, match=r"accounts\.carol: email 3 is not an email"):
        auth.load_accounts_file(_toml(tmp_path, "carol", hashes["alice"], "email = 3\n"))


def test_one_person_under_a_local_account_and_oidc_is_one_person(hashes: dict[str, str]) -> None:
    """The two-approver rule compared display names only, so local alice and OIDC alice@corp.example
    were two people. A person is their email where one is known (verified by the provider, or declared
    on the local account), else their namespaced name."""
    accounts = auth.parse_accounts(
        f"alice:approver:{hashes['alice']}:alice@corp.example;carol:approver:{hashes['bob']};"
        f"dan@corp.example:approver:{hashes['bob']}"
    )
    sso = auth.identity_from_oidc({"email": "Alice@Corp.example", "email_verified": True, "sub": "a"})
    assert auth.same_person("alice", sso.name, accounts)
    assert auth.same_person(sso.name, "alice", accounts)
    assert auth.same_person("dan@corp.example", "oidc:dan@corp.example", accounts)  # a name that is an email
    assert not auth.same_person("alice", "carol", accounts)
    # an OIDC user naming themselves "carol", or with carol's unverified email, is not local carol
    fake = auth.identity_from_oidc({"preferred_username": "carol", "sub": "x", "iss": ISS})
    assert not auth.same_person("carol", fake.name, accounts)
    unverified = auth.identity_from_oidc({"email": "alice@corp.example", "sub": "y", "iss": ISS})
    assert not auth.same_person("alice", unverified.name, accounts)
    assert auth.person_key(f"oidc:{ISS}#y", accounts) == f"oidc:{ISS}#y"


def _toml(tmp_path: Path, name: str, pw_hash: str, extra: str = "") -> Path:
    f = tmp_path / "accounts.toml"
    f.write_text(f'[accounts.{name}]\nrole = "approver"\npassword_hash = "{pw_hash}"\n{extra}')
    return f


def test_anonymous_is_refused() -> None:
    with pytest.raises(PermissionDenied, match="nobody is signed in"):
        auth.require_approver(None, "approve")


def test_a_short_signing_key_or_an_unreadable_accounts_file_is_refused_by_name(tmp_path) -> None:  # noqa: ANN001
    """With SPARSEPILOT_AUTH_KEY=a anyone could forge a token offline; an accounts file that is a directory
    used to end in a traceback."""
    from rollout.auth import MIN_AUTH_KEY_BYTES, AccountsConfigError, auth_key, load_accounts_file

    with pytest.raises(AccountsConfigError, match=r"SPARSEPILOT_AUTH_KEY is 1 bytes; .* at least 32"):
        auth_key({"SPARSEPILOT_AUTH_KEY": "a"})
    assert auth_key({"SPARSEPILOT_AUTH_KEY": "k" * MIN_AUTH_KEY_BYTES}) == b"k" * MIN_AUTH_KEY_BYTES
    with pytest.raises(AccountsConfigError, match="cannot read the accounts file"):
        load_accounts_file(tmp_path)


def test_a_password_reset_ends_the_accounts_login_tokens(hashes: dict[str, str]) -> None:
    """A token used to carry only the name and an expiry: after a leaked password was reset, the token
    taken with it stayed valid for up to 30 days."""
    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']};bob:viewer:{hashes['bob']}")
    key = b"k" * 32
    tok = auth.issue_token(auth.authenticate("alice", "alice-pw", accounts), key, now=1000.0)
    assert auth.verify_token(tok, key, accounts, now=2000.0).name == "alice"
    reset = {"alice": auth.Account("alice", "approver", auth.hash_password("alice-pw"))}  # even the same one
    with pytest.raises(PermissionDenied, match="password of 'alice' changed after this login token"):
        auth.verify_token(tok, key, reset, now=2000.0)
    with pytest.raises(ValueError, match="proven by password"):  # no token for an unproven identity
        auth.issue_token(Identity("alice", "approver", "cli-password"), key)


def test_configured_accounts_retire_the_first_run_admin(tmp_path: Path, hashes: dict[str, str]) -> None:
    """The first-run accounts.toml used to be read whenever no accounts file was named, so its generated
    admin (password printed by the first `make run`) kept signing in beside SPARSEPILOT_ACCOUNTS."""
    env = {"SPARSEPILOT_HOME": str(tmp_path)}
    name, password = auth.create_first_run_account(env)
    assert set(auth.load_accounts(env)) == {name}
    configured = {**env, "SPARSEPILOT_ACCOUNTS": f"bob:viewer:{hashes['bob']}"}
    assert set(auth.load_accounts(configured)) == {"bob"}
    assert auth.authenticate(name, password, auth.load_accounts(configured)) is None
    (tmp_path / "cfg").mkdir()
    as_file = {**env, "SPARSEPILOT_ACCOUNTS_FILE": str(_toml(tmp_path / "cfg", "carol", hashes["bob"]))}
    assert set(auth.load_accounts(as_file)) == {"carol"}


def test_a_short_or_exposed_signing_key_file_is_refused(tmp_path: Path) -> None:
    """Only SPARSEPILOT_AUTH_KEY was held to 32 bytes: an empty auth.key (a `touch`, a truncated restore)
    signed tokens anyone could forge with b"", and a world-readable one was used as it was."""
    env = {"SPARSEPILOT_HOME": str(tmp_path)}
    key_file = tmp_path / "auth.key"
    key_file.touch(mode=0o600)
    with pytest.raises(AccountsConfigError, match=r"auth.key is 0 bytes; .* at least 32"):
        auth.auth_key(env, create=True)
    key_file.write_bytes(b"k" * 32)
    key_file.chmod(0o644)
    with pytest.raises(AccountsConfigError, match=r"readable by others \(mode 644\); run `chmod 600"):
        auth.auth_key(env)
    key_file.chmod(0o600)
    assert auth.auth_key(env) == b"k" * 32


def test_a_failed_write_leaves_no_secret_behind(tmp_path: Path) -> None:
    """write_private onto a directory left the secret in a stray .<name>.<hex> file beside it."""
    (tmp_path / "token").mkdir()
    with pytest.raises(IsADirectoryError):
        auth.write_private(tmp_path / "token", b"secret")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["token"]


def test_a_token_from_before_the_password_fingerprint_says_so(hashes: dict[str, str]) -> None:
    """Review T5: a token issued by the previous build (no password fingerprint) was refused with "the
    password of 'alice' changed", when nobody had changed it."""
    import json

    accounts = auth.parse_accounts(f"alice:approver:{hashes['alice']}")
    key = b"k" * 32
    payload = auth._b64(json.dumps({"u": "alice", "exp": 10_000}).encode())
    old = f"{auth._TOKEN_PREFIX}.{payload}.{auth._mac(key, payload)}"
    with pytest.raises(PermissionDenied, match="from an older SparsePilot") as err:
        auth.verify_token(old, key, accounts, now=2000.0)
    assert "changed" not in str(err.value)


def test_first_run_files_made_by_two_processes_at_once_are_made_once(tmp_path: Path) -> None:
    """Review s46 C5: two `init`s at once both printed an admin password, and the file of one replaced
    the other's (its password never worked); two first logins at once signed a token with a key the
    other then replaced. Now the files are created, never replaced: one init prints the password that
    works, the other prints none, and both logins get the key in the file. Ten fresh homes, each raced
    by two spawned processes released at one instant."""
    import multiprocessing as mp

    from tests.trust.race_helpers import first_run_files

    homes = [str(tmp_path / f"home-{i}") for i in range(10)]
    ctx = mp.get_context("spawn")
    barrier, results = ctx.Barrier(2), ctx.Queue()
    procs = [ctx.Process(target=first_run_files, args=(homes, barrier, results)) for _ in range(2)]
    for p in procs:
        p.start()
    got = [results.get(timeout=300) for _ in range(4 * len(homes))]
    for p in procs:
        p.join(timeout=60)
    for home in homes:
        env = {"SPARSEPILOT_HOME": home}
        printed = [r for h, what, r in got if h == home and what == "account" and r is not None]
        assert len(printed) == 1, (home, printed)  # one password printed: the one that works
        name, password = printed[0]
        assert auth.authenticate(name, password, auth.load_accounts(env)).role == "approver"
        keys = [r for h, what, r in got if h == home and what == "key"]
        assert keys == [auth.auth_key(env)] * 2, home  # both logins sign with the key in the file
        assert sorted(p.name for p in Path(home).iterdir()) == ["accounts.toml", "auth.key"]  # no stray temp


def test_an_oidc_person_is_their_issuer_and_subject_whatever_the_email() -> None:
    """Review s46 A2: the same iss/sub signed in under two verified emails, or with the email not
    verified, is one person; another subject with the same issuer is not."""
    claims = {"iss": "https://idp.example", "sub": "42", "email_verified": True}
    a = auth.identity_from_oidc(claims | {"email": "alice@corp.example"})
    b = auth.identity_from_oidc(claims | {"email": "alice.smith@corp.example"})
    c = auth.identity_from_oidc(claims | {"email_verified": False, "email": "x@corp.example"})
    other = auth.identity_from_oidc(claims | {"sub": "43", "email": "bob@corp.example"})
    assert (a.name, b.name, c.name) == (
        "oidc:alice@corp.example",
        "oidc:alice.smith@corp.example",
        "oidc:https://idp.example#42",
    )
    assert a.subject == b.subject == c.subject == "https://idp.example#42"
    for x, y in ((a, b), (a, c), (b, c)):
        assert auth.same_person(x.name, y.name, {}, subjects=(x.subject, y.subject))
    assert not auth.same_person(a.name, other.name, {}, subjects=(a.subject, other.subject))
