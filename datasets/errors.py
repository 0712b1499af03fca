"""The one error type for user mistakes, shared by every layer of vis4mer.

A `UserError` says what the user gave that cannot work (a config key, a URI, a file, a video) and
what was expected, in one line. The `vis4mer` CLI prints it and exits with code 2; any other
exception is a bug inside vis4mer and keeps its traceback (exit code 1).

It lives here, at the bottom of the package (vis4mer.datasets imports neither vis4mer.model nor
vis4mer.orchestrator, and this module imports nothing), so that datasets and orchestrator raise the
same type. vis4mer.model raises ValueError for bad arguments, as PyTorch does; the orchestrator
turns those into UserErrors where a user's config reaches the model.
"""


class UserError(Exception):
    """A mistake in what the user asked for: one line naming the culprit and what was expected."""
