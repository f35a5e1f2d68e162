"""No secret is committed under docker/ or infra/: a scanner for keys, tokens and literal
passwords, and a check that it catches them.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.deploy_files import DOCKER, INFRA, REPO

SECRET_PATTERNS = {
    "AWS access key id": re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b"),
    "private key": re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----"),
    "GitHub token": re.compile(r"\bgh[pousr]_[A-Za-z0-9]{30,}"),
    "Slack token": re.compile(r"\bxox[abprs]-[A-Za-z0-9-]{10,}"),
    "JSON web token": re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}"),
    "40-character secret key": re.compile(r"(?<![A-Za-z0-9/+=])[A-Za-z0-9/+]{40}(?![A-Za-z0-9/+=])"),
}
# A password in a URL, or a value given on the same line to a password/secret/token key,
# must be a placeholder or a reference: ${VAR...}, $(VAR), $VAR, {{ var }}, <what to put>,
# or the absolute path of the file holding it (RAY_AUTH_TOKEN_PATH=/etc/...).
URL_PASSWORD = re.compile(r"://[^/\s:@]+:([^@\s/]+)@")
ASSIGNED_SECRET = re.compile(
    r"(?i)(?<![\w${])\w*(?:password|secret|token)\w*['\"]?[ \t]*[:=][ \t]*['\"]?([^\s'\"#,{\[][^\s'\"#,]*)"
)
ALLOWED_VALUE = re.compile(r"^(CHANGE_ME|<.*|\$\{.*|\$\(.*|\$\w+|\{\{.*|/[\w./-]+)$")

# Fields that name a Secret (secretName, existingSecret) or switch a feature
# (automountServiceAccountToken: false) hold no secret.
NAMES_A_SECRET = re.compile(r"(?i)^(?:secretName|existingSecret)\b")
FLAG = re.compile(r"(?i)^(true|false)$")


def _literal_secret(match: re.Match) -> bool:
    return not (ALLOWED_VALUE.match(match[1]) or FLAG.match(match[1]) or NAMES_A_SECRET.match(match.group(0)))


def find_secrets(text: str) -> list[str]:
    """What in ``text`` looks like a real secret (empty when nothing does)."""
    found = [f"{what}: {m.group(0)[:12]}..." for what, p in SECRET_PATTERNS.items() for m in p.finditer(text)]
    found += [f"password in a URL: {m.group(0)}" for m in URL_PASSWORD.finditer(text) if not ALLOWED_VALUE.match(m[1])]
    found += [f"literal secret: {m.group(0)}" for m in ASSIGNED_SECRET.finditer(text) if _literal_secret(m)]
    return found


def infra_files() -> list[Path]:
    paths = [p for p in (*DOCKER.rglob("*"), *INFRA.rglob("*")) if p.is_file()]
    # docker/.env holds a developer's real secrets and is git-ignored; never read it here.
    return sorted(p for p in paths if p != DOCKER / ".env" and "__pycache__" not in p.parts)


@pytest.mark.parametrize("path", infra_files(), ids=lambda p: str(p.relative_to(REPO)))
def test_no_secret_is_committed(path):
    assert find_secrets(path.read_text(errors="replace")) == []


@pytest.mark.parametrize(
    "sample",
    [
        "AWS_ACCESS_KEY_ID=AKIAABCDEFGHIJKLMNOP",
        "url: postgresql://user:hunter22@db:5432/x",
        "AWS_SECRET_ACCESS_KEY=wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY12",
        "POSTGRES_PASSWORD: s3cr3t-passw0rd",
        '"api_token": "abc123"',
    ],
)
def test_secret_scanner_catches_secrets(sample):
    assert find_secrets(sample)
