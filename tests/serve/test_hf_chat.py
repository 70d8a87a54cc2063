"""A Hugging Face model served with its own chat template: the prompt the server builds is
``transformers``' ``apply_chat_template`` (tokenized as transformers tokenizes it), and the
reply equals ``Model.generate`` on those ids; a template's raise_exception is a 400."""

from __future__ import annotations

import json

import openai
import pytest
import torch
from conftest import running
from helpers import bpe_tokenizer

import lmlab

transformers = pytest.importorskip("transformers")

TEMPLATE = (  # Zephyr's, with Llama-2's rule that roles alternate
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'assistant' and loop.index0 == 0 %}{{ raise_exception('the first message cannot be the assistant') }}{% endif %}"
    "{{ '<|' + message['role'] + '|>\n' + message['content'] + eos_token + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
)


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    tok = bpe_tokenizer()
    cfg = transformers.LlamaConfig(vocab_size=tok.get_vocab_size(), hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                   max_position_embeddings=256, bos_token_id=0, eos_token_id=0)  # fmt: skip
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.3)  # far from uniform: greedy choices not decided by rounding
    folder = tmp_path_factory.mktemp("hf") / "llama"
    model.save_pretrained(folder)
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>")
    fast.chat_template = TEMPLATE
    fast.save_pretrained(folder)
    return folder


def test_the_models_own_template_is_rendered_as_transformers_does(llama_dir):
    fast = transformers.AutoTokenizer.from_pretrained(str(llama_dir))
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "the sea and the sky"}]
    ids = fast.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    model = lmlab.load(llama_dir)
    eos = model.generation_config.get("eos_token_id")
    with running(llama_dir) as url:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        r = client.chat.completions.create(model="tiny", messages=messages, max_tokens=10, temperature=0)
        assert r.usage.prompt_tokens == len(ids)
        from lmlab.generate import generate_stream

        cfg = model._gen_config(max_new_tokens=10, temperature=0)
        want = next(res for _, _, res in generate_stream(model.module, model.tokenizer, [list(ids)], cfg) if res)
        assert r.choices[0].message.content == want.text and eos is not None
        with pytest.raises(openai.BadRequestError, match="the first message cannot be the assistant"):
            client.chat.completions.create(model="tiny", messages=[{"role": "assistant", "content": "hi"}])
    assert json.loads((llama_dir / "tokenizer_config.json").read_text()).get("chat_template") in (None, TEMPLATE)
