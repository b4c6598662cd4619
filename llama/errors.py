"""The one exception type for bad user input, and how entry points report it (and the faults a
user can act on) as one `error: ...` line."""
import errno
import sys
from typing import Callable


class LlamaInputError(ValueError):
    """A problem with the user's files or arguments, with a message that names the file."""


def report_errors(body: Callable[[], int], out) -> int:
    """Run an entry point's `body` (its exit status) writing to `out`; print what stops it as one
    `error: ...` line on stderr, no traceback: bad input (exit 2), an OSError such as a full disk
    (1), Ctrl-C (130). The writers are atomic (llama.files): whatever stops them leaves nothing
    new under a final name."""
    try:
        return body()
    except LlamaInputError as e:
        message, status = str(e), 2
    except KeyboardInterrupt:
        message, status = f"interrupted; nothing was written to {out}", 130
    except OSError as e:
        if e.errno == errno.ENOSPC:
            message = f"no space left on device writing {out}; nothing was written"
        else:
            message = f"{e.filename or out}: {e.strerror or e}"
        status = 1
    print(f"error: {message}", file=sys.stderr)
    return status
