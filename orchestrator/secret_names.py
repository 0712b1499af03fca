"""What names a secret: one list for every check vis4mer makes (config keys redacted before MLflow,
overrides refused on a job's command line, literal values refused in cluster manifests)."""
from __future__ import annotations

# compared with names lower-cased and without '_' or '-': SECRET_KEY, secret-key, secretKey all match
SECRET_WORDS = ("secret", "password", "passwd", "token", "accesskey", "credential", "apikey", "privatekey")


def names_secret(name: str) -> bool:
    """True when `name` (a config key, an environment variable, a manifest field) names a secret."""
    flat = name.lower().replace("_", "").replace("-", "")
    return any(word in flat for word in SECRET_WORDS)
