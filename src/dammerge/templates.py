"""Prompt templates shared by the miniature family, the evaluator and learned merging.

The Alpaca template is the one the DAM paper trains and evaluates with; keeping a single
definition guarantees that specialists are fine-tuned, merged and scored on identical prompts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)


def alpaca_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt (everything before the response) for one example."""
    if input:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def record_prompt(record: Mapping[str, Any]) -> str:
    """The Alpaca prompt of a record with an ``instruction`` and an optional ``input``."""
    return alpaca_prompt(record["instruction"], record.get("input") or "")


_ALPACA_PREAMBLE = ALPACA_NO_INPUT.split("\n\n")[0]
_ALPACA_INPUT_PREAMBLE = ALPACA_WITH_INPUT.split("\n\n")[0]

# Chat templates a recipe names with ``chat_template: NAME`` (the names mergekit 0.1.5 ships).
# Jinja as transformers renders it (trim_blocks, lstrip_blocks); each writes its format's
# documented layout. Special tokens a tokenizer lacks render as nothing.
CHAT_TEMPLATES: dict[str, str] = {
    # <|im_start|>ROLE\nCONTENT<|im_end|>\n per message
    "chatml": (
        "{%- for message in messages %}"
        "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
    ),
    # Meta Llama 3: BOS, then a header, the trimmed content and <|eot_id|> per message
    "llama3": (
        "{{- bos_token or '' }}"
        "{%- for message in messages %}"
        "{{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' }}"
        "{{- message['content'] | trim }}{{- '<|eot_id|>' }}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}"
        "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}"
        "{%- endif %}"
    ),
    # Mistral instruct: BOS, ' [INST] USER [/INST]' and ' ASSISTANT</s>' alternating; a leading
    # system message goes before the first user message
    "mistral": (
        "{%- if messages and messages[0]['role'] == 'system' %}"
        "{%- set system = messages[0]['content'] %}{%- set turns = messages[1:] %}"
        "{%- else %}{%- set system = none %}{%- set turns = messages %}{%- endif %}"
        "{{- bos_token or '' }}"
        "{%- for message in turns %}"
        "{%- if message['role'] not in ['user', 'assistant']"
        " or (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{- raise_exception('mistral: after an optional system message, the roles must "
        "alternate user, assistant, user, ...') }}"
        "{%- elif message['role'] == 'user' and loop.first and system is not none %}"
        "{{- ' [INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
        "{%- elif message['role'] == 'user' %}"
        "{{- ' [INST] ' + message['content'] + ' [/INST]' }}"
        "{%- else %}{{- ' ' + message['content'] }}{{- eos_token or '' }}"
        "{%- endif %}"
        "{%- endfor %}"
    ),
    # Alpaca (dammerge's prompts above): the preamble, or a system message in its place, then
    # ### Instruction / ### Input (role user_context) / ### Response sections, each after a
    # blank line; a response ends with EOS
    "alpaca": (
        "{%- set system = messages | selectattr('role', 'equalto', 'system') | list %}"
        "{%- set with_input = messages | selectattr('role', 'equalto', 'user_context') | list %}"
        "{%- if system %}{{- system[-1]['content'] }}"
        "{%- elif with_input %}{{- '" + _ALPACA_INPUT_PREAMBLE + "' }}"
        "{%- else %}{{- '" + _ALPACA_PREAMBLE + "' }}{%- endif %}"
        "{%- for message in messages %}"
        "{%- if message['role'] == 'user' %}"
        "{{- '\\n\\n### Instruction:\\n' + message['content'] }}"
        "{%- elif message['role'] == 'user_context' %}"
        "{{- '\\n\\n### Input:\\n' + message['content'] }}"
        "{%- elif message['role'] == 'assistant' %}"
        "{{- '\\n\\n### Response:\\n' + message['content'] }}{{- eos_token or '' }}"
        "{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt and messages[-1]['role'] != 'assistant' %}"
        "{{- '\\n\\n### Response:\\n' }}"
        "{%- endif %}"
    ),
    # EXAONE: [|ROLE|]CONTENT, then \n after a user message and [|endofturn|]\n after others;
    # an empty system turn first when the conversation has none
    "exaone": (
        "{%- for message in messages %}"
        "{%- if loop.first and message['role'] != 'system' %}"
        "{{- '[|system|][|endofturn|]\\n' }}"
        "{%- endif %}"
        "{{- '[|' + message['role'] + '|]' + message['content'] }}"
        "{%- if message['role'] == 'user' %}{{- '\\n' }}"
        "{%- else %}{{- '[|endofturn|]\\n' }}{%- endif %}"
        "{%- endfor %}"
        "{%- if add_generation_prompt %}{{- '[|assistant|]' }}{%- endif %}"
    ),
}
