"""Chat formats: a dialog [{"role", "content"}] -> the prompt tokens the chat model was tuned on,
ending where the assistant's answer starts. The tokenizer says which format its vocabulary was
made for (`Tokenizer.chat_format`); fine-tuning's chat templates build on the same functions."""
from typing import TypedDict

from llama.errors import LlamaInputError


class Message(TypedDict):
    role: str  # "system" | "user" | "assistant" (Llama-3 also "ipython")
    content: str


B_INST, E_INST = "[INST]", "[/INST]"
B_SYS, E_SYS = "<<SYS>>\n", "\n<</SYS>>\n\n"


def llama2_dialog(tokenizer, dialog: list[Message]) -> list[int]:
    """Llama-2 chat: `<s>[INST] <<SYS>>\\n{system}\\n<</SYS>>\\n\\n{user} [/INST] {answer} </s>`
    per exchange, ending with the last user message and an open `[/INST]`."""
    if dialog and dialog[0]["role"] == "system":
        first = {"role": dialog[1]["role"], "content": B_SYS + dialog[0]["content"] + E_SYS + dialog[1]["content"]}
        dialog = [first] + list(dialog[2:])
    roles = [m["role"] for m in dialog]
    if roles[0::2] != ["user"] * len(roles[0::2]) or roles[1::2] != ["assistant"] * len(roles[1::2]):
        raise LlamaInputError("a dialog must alternate user/assistant, starting with user (after an optional system)")
    if roles[-1] != "user":
        raise LlamaInputError("a dialog must end with a user message")
    tokens: list[int] = []
    for user, answer in zip(dialog[0::2], dialog[1::2]):
        text = f"{B_INST} {user['content'].strip()} {E_INST} {answer['content'].strip()} "
        tokens += tokenizer.encode(text, bos=True, eos=True)
    tokens += tokenizer.encode(f"{B_INST} {dialog[-1]['content'].strip()} {E_INST}", bos=True, eos=False)
    return tokens


LLAMA3_ROLES = ("system", "user", "assistant", "ipython")


def llama3_header(tokenizer, role: str) -> list[int]:
    """`<|start_header_id|>{role}<|end_header_id|>\\n\\n`."""
    if role not in LLAMA3_ROLES:
        raise LlamaInputError(f"unknown chat role {role!r}; Llama-3 chat knows {', '.join(LLAMA3_ROLES)}")
    return ([_special(tokenizer, "<|start_header_id|>")] + tokenizer.encode(role, bos=False, eos=False)
            + [_special(tokenizer, "<|end_header_id|>")] + tokenizer.encode("\n\n", bos=False, eos=False))


def llama3_message(tokenizer, role: str, content: str) -> list[int]:
    """One whole message: header, content stripped of surrounding white space, `<|eot_id|>`."""
    return llama3_header(tokenizer, role) + llama3_content(tokenizer, content)


def llama3_content(tokenizer, content: str) -> list[int]:
    """A message's body and its end: what an assistant turn is trained to produce."""
    return tokenizer.encode(content.strip(), bos=False, eos=False) + [_special(tokenizer, "<|eot_id|>")]


def llama3_dialog(tokenizer, dialog: list[Message]) -> list[int]:
    """Meta's Llama-3 ChatFormat: `<|begin_of_text|>`, each message, then an open assistant header."""
    if not dialog:
        raise LlamaInputError("an empty dialog")
    tokens = [tokenizer.bos_id]
    for message in dialog:
        tokens += llama3_message(tokenizer, message["role"], message["content"])
    return tokens + llama3_header(tokenizer, "assistant")


def _special(tokenizer, text: str) -> int:
    token = tokenizer.special_id(text)
    if token is None:
        raise LlamaInputError(f"{tokenizer.path}: has no {text} token, which Llama-3 chat needs")
    return token


CHAT_FORMATS = {"llama2": llama2_dialog, "llama3": llama3_dialog}


def encode_dialog(tokenizer, dialog: list[Message]) -> list[int]:
    """The dialog in the chat format of the tokenizer's vocabulary."""
    return CHAT_FORMATS[tokenizer.chat_format](tokenizer, dialog)
