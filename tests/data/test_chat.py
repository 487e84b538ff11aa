import json

import pytest
import tokenizers
from transformers import PreTrainedTokenizerFast

from lmlab.data.chat import ChatTemplate, UnsafeTemplateError, check_messages
from lmlab.errors import DataError, DataNotFoundError

# SmolLM2-135M-Instruct's template, copied from its GGUF (tokenizer.chat_template);
# test_smollm2_gguf_template_is_the_one_tested checks the copy.
CHATML = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging "
    "Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + "
    "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Llama-2-chat's template: the system prompt folded into the first user turn, and a
# raise_exception branch for roles that do not alternate.
LLAMA2 = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}"
    "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
    "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}"
    "{% endif %}"
    "{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)

# Written over several lines, as many Hub templates are: trim_blocks and lstrip_blocks
# decide the whitespace; also namespace, loop controls, tojson and strftime_now's presence.
MULTILINE = """{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
    {% set ns.turns = ns.turns + 1 %}
    <{{ message.role }} n="{{ ns.turns }}">{{ message.content | tojson }}</{{ message.role }}>
{% endfor %}
{% if tools %}tools: {{ tools | tojson(indent=2) }}
{% endif %}
{% if strftime_now is defined %}[clock]{% endif %}
{% if add_generation_prompt %}
    <assistant>
{% endif %}"""

CONVERSATIONS = {
    "one user turn": [{"role": "user", "content": "Hi"}],
    "with system": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2 + 2?"},
    ],
    "multi-turn": [
        {"role": "system", "content": "You answer in French."},
        {"role": "user", "content": "Hello <there> & 'you'"},
        {"role": "assistant", "content": "  Bonjour !  "},
        {"role": "user", "content": "Ça va?\nTwo lines."},
    ],
    "ends with assistant": [
        {"role": "user", "content": "Say yes"},
        {"role": "assistant", "content": "yes"},
    ],
}


def _hf_tokenizer(template: str) -> PreTrainedTokenizerFast:
    model = tokenizers.Tokenizer(tokenizers.models.BPE())
    model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    return PreTrainedTokenizerFast(
        tokenizer_object=model, bos_token="<s>", eos_token="</s>", chat_template=template
    )


@pytest.mark.parametrize("name", list(CONVERSATIONS))
@pytest.mark.parametrize("template", [CHATML, LLAMA2, MULTILINE], ids=["chatml", "llama2", "multi"])
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_transformers(template, name, add_generation_prompt):
    messages = CONVERSATIONS[name]
    hf = _hf_tokenizer(template)
    expected = hf.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )
    ours = ChatTemplate(template, bos_token="<s>", eos_token="</s>")
    assert ours.render(messages, add_generation_prompt=add_generation_prompt) == expected


def test_render_with_tools_matches_transformers():
    messages = CONVERSATIONS["with system"]
    tools = [{"type": "function", "function": {"name": "add", "description": "a < b & c"}}]
    expected = _hf_tokenizer(MULTILINE).apply_chat_template(
        messages, tools=tools, tokenize=False, add_generation_prompt=True
    )
    assert "tools:" in expected
    ours = ChatTemplate(MULTILINE, bos_token="<s>", eos_token="</s>")
    assert ours.render(messages, tools=tools) == expected


def test_chatml_renders_the_generation_prompt():
    text = ChatTemplate(CHATML).render([{"role": "user", "content": "Hi"}])
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    text = ChatTemplate(CHATML).render([{"role": "user", "content": "Hi"}], False)
    assert text.endswith("Hi<|im_end|>\n")


def test_smollm2_gguf_template_is_the_one_tested():
    from lmlab.checkpoint.pretrained import pretrained_path

    template = ChatTemplate.from_gguf(pretrained_path("smollm2"))
    assert template.source == CHATML
    assert template.bos_token == "<|im_start|>"
    assert template.eos_token == "<|im_end|>"


def test_raise_exception_is_a_data_error_with_the_templates_message():
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(DataError, match="Conversation roles must alternate"):
        ChatTemplate(LLAMA2).render(bad)


@pytest.mark.parametrize(
    "messages, match",
    [
        ("hi", "messages must be a list"),
        ([{"role": "user", "content": "a"}, "b"], "message 1 is a str"),
        (
            [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}],
            "message 1 has role 'bot'; valid roles: system, user, assistant, tool",
        ),
        ([{"content": "a"}], "message 0 has role None"),
        ([{"role": "user"}], r"message 0 \(user\) has no content"),
        ([{"role": "user", "content": 3}], r"message 0 \(user\) has a int"),
        ([{"role": "user", "content": "a", "extra": object()}], "message 0 holds a object"),
    ],
)
def test_bad_messages_name_the_message(messages, match):
    with pytest.raises(DataError, match=match):
        ChatTemplate(CHATML).render(messages)


def test_messages_are_copied_not_shared():
    messages = [{"role": "user", "content": "a", "name": "ann"}]
    copy = check_messages(messages)
    assert copy == messages and copy[0] is not messages[0]


def test_syntax_error_names_the_line():
    with pytest.raises(DataError, match="syntax error at line 2"):
        ChatTemplate("{{ messages }}\n{% if %}")


def test_undefined_variables_render_empty_as_in_transformers():
    assert ChatTemplate("[{{ nothing }}]").render([]) == "[]"
    with pytest.raises(DataError, match="the chat template failed: UndefinedError"):
        ChatTemplate("{{ nothing.deeper }}").render([])


# ----------------------------------------------------------------------------- sandbox (item 17)

ESCAPES = [
    "{{ ''.__class__ }}",
    "{{ ''.__class__.__mro__ }}",
    "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "{% for c in ().__class__.__base__.__subclasses__() %}{{ c }}{% endfor %}",
    "{{ cycler.__init__.__globals__.os.system('touch {marker}') }}",
    "{{ raise_exception.__globals__['os'].system('touch {marker}') }}",
    "{{ strftime_now.__globals__ }}",
    "{{ messages[0].content.__class__ }}",
    "{% if messages.__class__ %}x{% endif %}",
    "{{ messages.append({'role': 'user'}) }}",
    "{{ messages[0].update({'role': 'system'}) }}",
    "{{ namespace(__init__=1) }}",
    "{{ dict.__class__ }}",
    "{{ lipsum.__globals__['os'].system('touch {marker}') }}",
    "{{ ''.format.__globals__ }}",
]


@pytest.mark.parametrize("source", ESCAPES)
def test_template_cannot_escape_the_sandbox(source, tmp_path):
    marker = tmp_path / "pwned"
    template = ChatTemplate(source.replace("{marker}", str(marker)))
    messages = [{"role": "user", "content": "hi"}]
    with pytest.raises(UnsafeTemplateError, match="unsafe operation"):
        template.render(messages)
    assert not marker.exists()
    assert messages == [{"role": "user", "content": "hi"}]


def test_unsafe_template_error_is_a_data_error():
    assert issubclass(UnsafeTemplateError, DataError)


def test_format_string_attack_is_stopped():
    # str.format can reach attributes without the dot syntax the sandbox checks
    with pytest.raises(UnsafeTemplateError):
        ChatTemplate("{{ '{0.__class__.__mro__}'.format(messages) }}").render([])


def test_kwargs_must_be_json_data():
    import os

    with pytest.raises(DataError, match="holds a module"):
        ChatTemplate("{{ tools }}").render([], tools=os)


# ----------------------------------------------------------------------------- loading


def test_from_tokenizer_config_reads_template_and_special_tokens(tmp_path):
    config = {
        "chat_template": LLAMA2,
        "bos_token": {"content": "<s>", "lstrip": False},
        "eos_token": "</s>",
        "unk_token": None,
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    for source in (tmp_path, tmp_path / "tokenizer_config.json", config):
        template = ChatTemplate.from_tokenizer_config(source)
        assert template.source == LLAMA2
        assert template.bos_token == "<s>" and template.eos_token == "</s>"
        assert "unk_token" not in template.special
    expected = _hf_tokenizer(LLAMA2).apply_chat_template(
        CONVERSATIONS["multi-turn"], tokenize=False
    )
    assert template.render(CONVERSATIONS["multi-turn"], add_generation_prompt=False) == expected


def test_from_tokenizer_config_picks_the_default_of_named_templates():
    config = {
        "chat_template": [
            {"name": "tool_use", "template": "tools"},
            {"name": "default", "template": CHATML},
        ]
    }
    assert ChatTemplate.from_tokenizer_config(config).source == CHATML
    config["chat_template"].pop()
    assert ChatTemplate.from_tokenizer_config(config).source == "tools"  # the only one
    config["chat_template"].append({"name": "rag", "template": "rag"})
    with pytest.raises(DataError, match="none named 'default'"):
        ChatTemplate.from_tokenizer_config(config)


def test_from_tokenizer_config_without_template_is_none(tmp_path):
    assert ChatTemplate.from_tokenizer_config({"eos_token": "</s>"}) is None
    (tmp_path / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    assert ChatTemplate.from_tokenizer_config(tmp_path) is None


def test_chat_template_jinja_file_takes_precedence(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text('{"chat_template": "old", "eos_token": "E"}')
    (tmp_path / "chat_template.jinja").write_text(CHATML)
    template = ChatTemplate.from_tokenizer_config(tmp_path)
    assert template.source == CHATML and template.eos_token == "E"


def test_from_tokenizer_config_errors(tmp_path):
    with pytest.raises(DataNotFoundError):
        ChatTemplate.from_tokenizer_config(tmp_path / "missing.json")
    (tmp_path / "tokenizer_config.json").write_text("{not json")
    with pytest.raises(DataError, match="not valid JSON"):
        ChatTemplate.from_tokenizer_config(tmp_path)
