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


def names_secret(name: str) -> bool:
    """True when `name` (a config key, an environment variable, a manifest field) names a secret."""
    flat = name.lower().replace("_", "").replace("-", "")
    return any(word in flat for word in SECRET_WORDS)


def redact(text: str) -> str:
    """`text` with every user name and password of a URI, and the value of every environment variable
    whose name names a secret, replaced by ***: the last filter before an error line is printed."""
    text = _USERINFO.sub(r"\1***@", text)
    for name, value in os.environ.items():
        if len(value) >= MIN_SECRET_LEN and names_secret(name) and value in text:
            text = text.replace(value, "***")
    return text
