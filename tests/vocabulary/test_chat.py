"""``chat_template:``: each named template renders its format's documented layout, and the
chosen template (a name, a literal Jinja template, or ``auto``) is what transformers applies
to the merged model's tokenizer."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

import dammerge
from dammerge.templates import CHAT_TEMPLATES, alpaca_prompt
from dammerge.testing import tiny_tokenizer
from dammerge.vocabulary.chat import NoChatTemplateWarning

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello!"},
    {"role": "user", "content": "Bye"},
]
# Each format's layout written out (the tiny tokenizer's BOS is <s>, its EOS </s>).
EXPECTED = {
    "chatml": "<|im_start|>system\nYou are terse.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
    "<|im_start|>assistant\nHello!<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n"
    "<|im_start|>assistant\n",
    "llama3": "<s><|start_header_id|>system<|end_header_id|>\n\nYou are terse.<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\nHello!<|eot_id|>"
    "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
    "<|start_header_id|>assistant<|end_header_id|>\n\n",
    "mistral": "<s> [INST] You are terse.\n\nHi [/INST] Hello!</s> [INST] Bye [/INST]",
    "alpaca": "You are terse.\n\n### Instruction:\nHi\n\n### Response:\nHello!</s>\n\n"
    "### Instruction:\nBye\n\n### Response:\n",
    "exaone": "[|system|]You are terse.[|endofturn|]\n[|user|]Hi\n"
    "[|assistant|]Hello![|endofturn|]\n[|user|]Bye\n[|assistant|]",
}


def render(template: str, messages: list[dict[str, str]], prompt: bool = True) -> str:
    return tiny_tokenizer().apply_chat_template(
        messages, chat_template=template, tokenize=False, add_generation_prompt=prompt
    )


def linear(models: list[Path], **extra) -> dict:
    return {
        "merge_method": "linear",
        "models": [{"model": str(m), "parameters": {"weight": 1.0}} for m in models],
        **extra,
    }


@pytest.mark.parametrize("name", sorted(CHAT_TEMPLATES))
def test_named_templates_render_their_format(name):
    assert render(CHAT_TEMPLATES[name], CONVERSATION) == EXPECTED[name]


def test_alpaca_template_gives_the_alpaca_prompts():
    user = [{"role": "user", "content": "Add 2 and 3."}]
    assert render(CHAT_TEMPLATES["alpaca"], user) == alpaca_prompt("Add 2 and 3.")
    with_input = [*user, {"role": "user_context", "content": "2, 3"}]
    assert render(CHAT_TEMPLATES["alpaca"], with_input) == alpaca_prompt("Add 2 and 3.", "2, 3")
    llama3_start = render(CHAT_TEMPLATES["llama3"], user, prompt=False)
    assert llama3_start == "<s><|start_header_id|>user<|end_header_id|>\n\nAdd 2 and 3.<|eot_id|>"


def test_mistral_template_refuses_roles_out_of_turn():
    with pytest.raises(Exception, match="alternate"):
        render(CHAT_TEMPLATES["mistral"], [CONVERSATION[1], CONVERSATION[1]])


def test_a_named_template_is_written_into_the_output(llama_family, tmp_path):
    base, (a, _, _) = llama_family
    out = dammerge.merge(linear([base, a], chat_template="chatml"), tmp_path / "o", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rendered = tokenizer.apply_chat_template(
        CONVERSATION, tokenize=False, add_generation_prompt=True
    )
    assert rendered == EXPECTED["chatml"]
    assert (out / "chat_template.jinja").is_file()
    assert tokenizer.get_vocab() == AutoTokenizer.from_pretrained(base).get_vocab()
    AutoModelForCausalLM.from_pretrained(out)


def test_a_literal_template_is_written_as_given(llama_family, tmp_path):
    base, (a, _, _) = llama_family
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}|{% endfor %}"
    out = dammerge.merge(linear([base, a], chat_template=template), tmp_path / "o", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.chat_template == template
    rendered = tokenizer.apply_chat_template(CONVERSATION[1:3], tokenize=False)
    assert rendered == "user: Hi|assistant: Hello!|"


def with_template(src: Path, dst: Path, template: str | None) -> Path:
    shutil.copytree(src, dst)
    if template is not None:
        tokenizer = AutoTokenizer.from_pretrained(dst)
        tokenizer.chat_template = template
        tokenizer.save_pretrained(dst)
    return dst


def test_auto_takes_the_template_most_models_carry(llama_family, tmp_path):
    base, variants = llama_family
    first, second = CHAT_TEMPLATES["llama3"], CHAT_TEMPLATES["chatml"]
    models = [
        with_template(base, tmp_path / "base", first),
        with_template(variants[0], tmp_path / "a", second),
        with_template(variants[1], tmp_path / "b", second),
        with_template(variants[2], tmp_path / "c", None),
    ]
    out = dammerge.merge(linear(models, chat_template="auto"), tmp_path / "o", progress=False)
    assert AutoTokenizer.from_pretrained(out).chat_template == second
    # a tie goes to the first model in the recipe's order
    tie = dammerge.merge(linear(models[:2], chat_template="auto"), tmp_path / "t", progress=False)
    assert AutoTokenizer.from_pretrained(tie).chat_template == first


def test_auto_without_templates_keeps_the_tokenizer(llama_family, tmp_path):
    base, (a, _, _) = llama_family
    cfg = linear([base, a], chat_template="auto")
    with pytest.warns(NoChatTemplateWarning):
        out = dammerge.merge(cfg, tmp_path / "o", progress=False)
    assert (out / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert AutoTokenizer.from_pretrained(out).chat_template is None


def test_union_and_chat_template_together(vocab_models, tmp_path):
    m = vocab_models
    cfg = linear([m["base"], m["b"]], tokenizer_source="union", chat_template="mistral")
    out = dammerge.merge(cfg, tmp_path / "o", progress=False)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert "<b1>" in tokenizer.get_vocab()
    assert tokenizer.apply_chat_template(CONVERSATION, tokenize=False) == EXPECTED["mistral"]


@pytest.mark.parametrize(
    ("template", "match"),
    [
        ("chatmll", "unknown chat_template 'chatmll'"),
        ("{% for m in messages %}{{ m }}", "not a valid Jinja template"),
    ],
)
def test_bad_templates_fail_the_dry_run(llama_family, tmp_path, template, match):
    base, (a, _, _) = llama_family
    cfg = linear([base, a], chat_template=template)
    with pytest.raises(dammerge.DammergeError, match=match) as caught:
        dammerge.merge(cfg, tmp_path / "o", dry_run=True, progress=False)
    assert caught.value.hint and "\n" not in caught.value.message


def test_a_chat_template_needs_a_tokenizer_to_go_into(vocab_models, tmp_path):
    bare = vocab_models["bare"]
    with pytest.raises(dammerge.DammergeError, match="needs a tokenizer"):
        dammerge.merge(linear([bare], chat_template="chatml"), tmp_path / "o", progress=False)
    assert not (tmp_path / "o").exists()
