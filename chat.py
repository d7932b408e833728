"""The chat template's side of a dialogue (paper Sec. 3: the state s_t is the dialogue so far, and the
transition appends the tool's response): where an assistant turn ends, which role carries a tool
response, and the check that an observation really is in the tokens the policy sees.

Real chat templates differ in exactly these (policy.Policy detects them once at load):
    end of turn     <|im_end|> (ChatML: Qwen2, Qwen2.5, SmolLM2), <|eot_id|> (Llama-3.1)
    tool responses  Qwen2's generic ChatML renders any role, so ToolBench's `function` (the original's
                    data); Qwen2.5 renders `tool` as <tool_response> inside a user turn and skips any
                    role it does not know, `function` included, without a word; Llama-3.1 renders
                    `tool` under its ipython header, through tojson
A template that renders no tool response in any role, or drops one, is an error: never a silent loss.

Departures: none from the paper; ToolBench's own data uses the `function` role, kept where it renders.
"""
import json
import re

# ChatML, for models that ship no template (base models); the original's Qwen2 data is ChatML
CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def end_of_turn(tok):
    """The token that ends an assistant turn in this chat template (e.g. <|im_end|>, <|eot_id|>)."""
    probe = "XYZZY"
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}, {"role": "assistant", "content": probe}],
                                   tokenize=False)
    tail = tok(text[text.rindex(probe) + len(probe):], add_special_tokens=False)["input_ids"]
    special = set(tok.all_special_ids) | {tok.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|eot_id|>", "<|end|>")
                                          if t in tok.get_vocab()}
    eot = next((i for i in tail if i in special), tok.eos_token_id)
    if eot is None:
        raise ValueError("cannot find the end-of-turn token of this chat template")
    return eot, tok.convert_ids_to_tokens(eot)


_PROBE = '{"error": "", "response": "XYZZY <tool & reply\'s> 42"}'  # shaped like an observation


def observation_role(tok):
    """The role that carries tool responses in this chat template, detected once at load.

    The template's own `tool` role when it names one (Qwen2.5, Llama-3.1), else ToolBench's
    `function` (the role of the original's Qwen2 data), else `tool`, else `user`: the first whose
    content the template renders. A template that renders none is an error, never a silent drop
    (Qwen2.5's template skips a `function` message without a word)."""
    src = tok.chat_template if isinstance(tok.chat_template, str) else json.dumps(tok.chat_template)
    roles = (("tool",) if re.search(r"""['"]tool['"]""", src or "") else ()) + ("function", "tool", "user")
    for role in roles:
        msgs = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"},
                {"role": "assistant", "content": "a"}, {"role": role, "content": _PROBE}]
        try:
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 -- a template may raise_exception() on a role it refuses
            continue
        if shows(_PROBE, text):
            return role
    raise ValueError("the chat template renders no tool response in any role (tried function, tool, user)")


def shows(content, text):
    """Does `text` carry `content`: verbatim (some templates trim it) or as a JSON string (Llama-3.1's
    template writes a tool message through tojson)?"""
    c = content.strip()
    enc = [json.dumps(content, ensure_ascii=False), json.dumps(content)]
    enc.append(enc[1].replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026").replace("'", "\\u0027"))
    return any(v in text for v in [c] + enc)
