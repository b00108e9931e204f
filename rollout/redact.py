"""Secrets never reach a message: passwords in URLs, bearer tokens, password hashes, our own session
tokens, the signatures of presigned cloud URLs (S3, GCS, Azure SAS; inside a percent-encoded URL too)
and the API keys and tokens whose form names them (Hugging Face, Databricks, GitHub, AWS access key ids,
OpenAI-style ``sk-``) are replaced before text is printed, logged, shown on the dashboard or written to
the audit log. `RedactingFilter` does it for every log record a handler it sits on writes (message and
traceback); `redacted_exception` for an exception's text, before an orchestrator stores it as a run's
state message."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable

MASK = "***"

# scheme://user:password@host -> scheme://user:***@host (any scheme: postgresql+psycopg, redis, https). A
# password may hold any character ('/' from `openssl rand -base64`, '@', a space; SQLAlchemy takes them).
# It runs to the last '@' of the URL's own word: "u:a@b@h/x" (a parser taking the last '@' reads "a@b");
# a password with a space has none in its first word, and runs on to the first word that holds one
# ("app:s3cr et@db", "app:w x@y@h"), never beyond it: a later "for a@b" is not part of it. Masking too
# much is the safe error. scheme://host:port is no password: digits, then a path or the URL's end, with no
# '@' before the next space ("https://h:5000/api failed for a@b" had "5000/api failed for a" masked). Only
# a password of digits and a space, or digits, a path and a space, looks the same, and is shown. A
# bracketed IPv6 host is a host: its ':'s end no user name, and a port after its ']' is judged as above
# ("http://[::1]:4200/api failed for a@b" was shown as "http://[:***@b", s45 T3).
_SCHEME = r"[A-Za-z][A-Za-z0-9+.\-]*://"
_IPV6_HOST = r"\[[^\]\s/@]*\]"
_USER_OR_HOST = rf"(?:{_IPV6_HOST}|(?!{_IPV6_HOST})[^/\s:@]*)"  # never the inside of an IPv6 host
_PORT = r"\d{1,5}(?:[/?#][^\s@]*|[.,;:!?)\]'\"]*)(?=\s|$)"
_IN_WORD = rf"(?:(?!{_SCHEME})\S)*"  # greedy: to the word's last '@'
_TO_WORD_WITH_AT = rf"(?:(?!{_SCHEME})[^@\r\n])*{_IN_WORD}"  # over spaces to the first word with an '@'
_URL_PASSWORD = re.compile(
    rf"(?P<head>{_SCHEME}{_USER_OR_HOST}:)(?!{_PORT})(?P<secret>{_IN_WORD}(?=@)|{_TO_WORD_WITH_AT}(?=@))(?P<tail>@)"
)
# key=value / key: value pairs whose key names a secret (password=..., token: ..., X-Api-Key: ..., a
# dict's {'password': ...}). The key
# may not begin inside a path: "/etc/passwd: cannot be used" is a message, not a secret. (A use case's
# name is never such a key, `rollout.spec.SECRET_LIKE_NAME`: "forgot-password: no active pilot" had its
# next word masked.)
SECRET_KEY = r"(?:password|passwd|pwd|secret|token|api[_-]?key|access[_-]?key|auth[_-]?string)"
_KEY_VALUE = re.compile(
    rf"(?i)(?P<head>(?<![\w/.\-])[\w.\-]*{SECRET_KEY}['\"]?\s*[=:]\s*)"
    r"(?P<quote>['\"]?)(?P<secret>[^\s'\",;&)]+)"
)
# The same pair inside a percent-encoded URL ("?next=%2Fapi%3Fpassword%3Dhunter2%26page%3D2": a redirect
# target, a callback): the separator is "%3D" or "%3A", and the value runs to the next encoded separator
# ("%26" &, "%3B" ;, "%2C" ,, "%20" a space) or an unencoded one; other escapes inside it are its own.
_ENCODED_SEPARATOR = r"%(?:26|3[Bb]|2[Cc]|20)"
_ENCODED_KEY_VALUE = re.compile(
    rf"(?i)(?P<head>[\w.\-]*{SECRET_KEY}%3[DdAa])"
    rf"(?P<secret>(?:(?!{_ENCODED_SEPARATOR})[^\s'\",;&)])+)"
)
_BEARER = re.compile(
    r"(?i)(?P<head>\bbearer\s+|\bauthorization:\s*basic\s+)(?P<secret>[A-Za-z0-9._~+/\-]+=*)"
)
# scrypt$n$r$p$salt$hash (our password hashes) and sp1.<payload>.<mac> (our CLI session tokens)
_SCRYPT = re.compile(r"scrypt\$\d+\$\d+\$\d+\$[A-Za-z0-9_\-]+\$[A-Za-z0-9_\-]+")
_SESSION_TOKEN = re.compile(r"\bsp1\.[A-Za-z0-9_\-]+\.[A-Za-z0-9_\-]+")
# A presigned URL's signing parameters, in its query only (after '?', '&', the ';' of an HTML "&amp;" or
# "&#38;", or an '&' a string escaped: JSON's "\u0026", as Go's encoding/json writes every '&', a repr's
# "\x26"):
# S3 v4 (X-Amz-Signature, X-Amz-Credential: the access key id, X-Amz-Security-Token), S3 v2
# (AWSAccessKeyId, Signature), GCS (X-Goog-Signature, X-Goog-Credential), Azure SAS (sig). Anyone holding
# the URL may use it until it expires. The value runs to the next parameter (an escaped '&' too), a space
# or a quote.
_SIGNED_KEY = (
    r"(?:x-amz-(?:signature|credential|security-token)|x-goog-(?:signature|credential)"
    r"|awsaccesskeyid|signature|sig)"
)
_QUERY_VALUE = r"[^&\s#'\"<>()\[\]{},;]"
_ESCAPED_AMPERSAND = r"\\u0026|\\x26"
_SIGNED_QUERY = re.compile(
    rf"(?i)(?P<head>(?:[?&;]|{_ESCAPED_AMPERSAND}){_SIGNED_KEY}=)"
    rf"(?P<secret>(?:(?!{_ESCAPED_AMPERSAND}){_QUERY_VALUE})+)"
)
# The same parameters inside a URL that was itself percent-encoded, once or twice (a redirect target, an
# error quoting the URL: "%3Fsv%3D2022-11-02%26sig%3Dk9Zq%252B4T%253D"): '?', '&' or ';' before the key
# and the '=' after it encoded alike ("%3F"/"%26"/"%3B", "%3D"; "%253F"... twice), and the value running
# to the next encoded character of that depth or shallower that ends a raw one ("%26" &, "%3B", "%2C",
# "%20", "%23" #, a quote, a bracket; "%2526"...) or an unencoded one; a deeper escape inside it ("%252B",
# an encoded '+' of the signature) is its own.
_ENCODED_QUERY_END = r"(?:26|3B|2C|20|23|22|27|3C|3E|28|29|5B|5D|7B|7D)"
_ENCODED_SIGNED_QUERY = re.compile(
    rf"(?i)(?P<head>(?P<esc>%(?:25)?)(?:3F|26|3B){_SIGNED_KEY}(?P=esc)3D)"
    rf"(?P<secret>(?:(?!(?P=esc){_ENCODED_QUERY_END}|%{_ENCODED_QUERY_END}){_QUERY_VALUE})+)"
)
# Keys and tokens known by their form, wherever they stand (an environment dump, a config line, an error):
# the prefix is kept so a reader sees which kind leaked. Each is a whole word of its own and as long as
# the real ones: "dapis", "hf_hub_download", "sk-learn-compatible" and hex digests (plan hashes, MLflow
# run ids) are none of them. A key may also follow an escaped character, whose escape ends in a letter or
# digit: a URL's percent-encoding ("?token%3Dhf_...", after %20, %2F, %3A; %253D, encoded twice) and a
# string's backslash escape (a repr's or JSON's \n, \x3d, \u003d) were read as the start of the word, and
# the key after them shown.
_W = r"[A-Za-z0-9_\-]"
_ESCAPED = (
    r"(?<=%[0-9A-Fa-f]{2})|(?<=%25[0-9A-Fa-f]{2})"  # percent-encoded, once or twice
    r"|(?<=\\[nrt])|(?<=\\x[0-9A-Fa-f]{2})|(?<=\\u[0-9A-Fa-f]{4})"  # backslash escapes
)
_WORD_START = rf"(?:(?<!{_W})|{_ESCAPED})"
_KNOWN_TOKENS = re.compile(
    rf"{_WORD_START}(?:"
    r"hf_[A-Za-z0-9]{30,}"  # Hugging Face: hf_ + 34 letters and digits
    r"|dapi[0-9a-f]{32}(?:-\d+)?"  # Databricks: dapi + 32 hex digits (a "-2" suffix too)
    r"|gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{30,}"  # GitHub
    r"|(?:AKIA|ASIA)[A-Z0-9]{16}"  # AWS access key id (long-lived, temporary)
    # OpenAI-style sk-..., sk-proj-..., sk-ant-...: random letters of both cases and digits, 20 of them in
    # a row somewhere (a name like "sk-learn-2024-compatible" has neither)
    rf"|sk-(?={_W}*[A-Z])(?={_W}*[a-z])(?={_W}*[0-9])(?={_W}*?[A-Za-z0-9]{{20}}){_W}{{20,}}"
    r")(?![A-Za-z0-9])"
)
_TOKEN_KIND = re.compile(r"hf_|dapi|gh[pousr]_|github_pat_|AKIA|ASIA|sk-")


def mask_db_url(url: str) -> str:
    """A database URL as SQLAlchemy reads it, its password (whatever it holds) shown as ``***``; one
    SQLAlchemy cannot parse goes through `redact`."""
    from sqlalchemy.engine import make_url

    try:
        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - an unparsable URL is still shown without its secret
        return redact(url)


def redact(text: object) -> str:
    """``text`` as a string with every recognisable secret replaced by ``***``."""
    s = str(text)
    s = _URL_PASSWORD.sub(lambda m: f"{m['head']}{MASK}{m['tail']}", s)
    s = _BEARER.sub(lambda m: f"{m['head']}{MASK}", s)
    s = _SCRYPT.sub(f"scrypt${MASK}", s)
    s = _SESSION_TOKEN.sub(f"sp1.{MASK}", s)
    s = _SIGNED_QUERY.sub(lambda m: f"{m['head']}{MASK}", s)
    s = _ENCODED_SIGNED_QUERY.sub(lambda m: f"{m['head']}{MASK}", s)
    s = _KNOWN_TOKENS.sub(lambda m: f"{_TOKEN_KIND.match(m[0])[0]}{MASK}", s)
    # a value already masked keeps its kind ("token%3Dhf_***")
    s = _ENCODED_KEY_VALUE.sub(lambda m: m[0] if MASK in m["secret"] else f"{m['head']}{MASK}", s)
    s = _KEY_VALUE.sub(lambda m: f"{m['head']}{m['quote']}{MASK}", s)
    return s


def redacted_name(name: str) -> str:
    """A name that says who someone is (an audit row's actor or entity id, an OIDC signer's
    ``<issuer>#<subject>``) as it may be shown: each part between '#'s redacted on its own, so an issuer and
    a subject are not read together as a URL's password ("https://idp#ldap:ann@corp.com" stays), while a
    part that is a token or a ``password=`` pair is masked."""
    return "#".join(redact(part) for part in name.split("#"))


class RedactingFilter(logging.Filter):
    """On a log handler: the record it writes is redacted, its message (arguments filled in), its
    traceback (`exc_text`, formatted here as `logging.Formatter` does, the chained causes with it) and
    its stack. The record is changed in place, so the handlers after this one get the redacted text too;
    nothing is dropped."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - a bad format string: the handler reports it as usual
            return True
        record.msg, record.args = redact(message), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        if record.stack_info:
            record.stack_info = redact(record.stack_info)
        return True


def redact_log_records(handlers: Iterable[logging.Handler]) -> None:
    """Give each handler a `RedactingFilter`, once."""
    for handler in handlers:
        if not any(isinstance(f, RedactingFilter) for f in handler.filters):
            handler.addFilter(RedactingFilter())


_PLAIN = (str, int, float, bool, type(None))


def redacted_exception(exc: Exception) -> Exception | None:
    """None when ``str(exc)`` holds no secret. Otherwise an exception of the same type whose text is
    redacted (its plain attributes copied, strings redacted: MLflow's `message`, `error_code`), or, for
    a type that cannot be made to show exactly the redacted text, a RuntimeError saying
    ``<type>: <redacted text>``. The caller raises it ``from exc``: a traceback shows the original as its
    cause (logs redact it), while a pickled exception (a flow's stored result) keeps no cause."""
    text = str(exc)
    clean = redact(text)
    if clean == text:
        return None
    cls = type(exc)
    for make in (lambda: cls(clean), lambda: cls.__new__(cls, clean)):
        try:
            new = make()
            new.args = (clean,)
            for key, value in vars(exc).items():
                if isinstance(value, _PLAIN):
                    setattr(new, key, redact(value) if isinstance(value, str) else value)
            shown = str(new)
        except Exception:  # noqa: BLE001, S112 - a type that needs more than a message: the next way
            continue
        if shown == clean:
            return new
    return RuntimeError(f"{cls.__name__}: {clean}")
