"""What names a secret, and how a message keeps secrets out: one list for every check vis4mer makes
(config keys redacted before MLflow, overrides refused on a job's command line, literal values
refused in cluster manifests) and one filter for every error line the CLI prints."""
from __future__ import annotations

import os
import re

# compared with names lower-cased and without '_' or '-': SECRET_KEY, secret-key, secretKey all match
SECRET_WORDS = ("secret", "password", "passwd", "token", "accesskey", "credential", "apikey", "privatekey")
_USERINFO = re.compile(r"(?i)([a-z][a-z0-9+.-]*://)[^/@\s'\"]+@")
MIN_SECRET_LEN = 4  # shorter values would mask ordinary words
MIN_CUT_LEN = 8  # a secret's beginning this long or longer is masked too: error lines cut long values short


def names_secret(name: str) -> bool:
    """True when `name` (a config key, an environment variable, a manifest field) names a secret."""
    flat = name.lower().replace("_", "").replace("-", "")
    return any(word in flat for word in SECRET_WORDS)


def redact(text: str) -> str:
    """`text` with every user name and password of a URI, and the value of every environment variable
    whose name names a secret (or its first MIN_CUT_LEN or more characters), replaced by ***: the last
    filter before an error line is printed."""
    text = _USERINFO.sub(r"\1***@", text)
    for name, value in os.environ.items():
        if len(value) < MIN_SECRET_LEN or not names_secret(name):
            continue
        # the whole value, else its longest beginning still there (a value cut short: `{v!r:.80}`)
        for cut in [value, *(value[:k] for k in range(len(value) - 1, MIN_CUT_LEN - 1, -1))]:
            if cut in text:
                text = text.replace(cut, "***")
                break
    return text


def holds_secret(text: str) -> bool:
    """Whether `text` carries a credential: a URI's user name or password, or the value of an
    environment variable whose name names a secret (values of MIN_CUT_LEN or more characters: a short
    one, such as a test's "test", would match ordinary words). For what is sent, not printed."""
    if _USERINFO.search(text):
        return True
    return any(len(v) >= MIN_CUT_LEN and names_secret(k) and v in text for k, v in os.environ.items())
