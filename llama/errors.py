"""The one exception type for bad user input; entry points print it as a one-line error."""


class LlamaInputError(ValueError):
    """A problem with the user's files or arguments, with a message that names the file."""
