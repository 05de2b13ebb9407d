"""Render chat templates the way transformers' apply_chat_template does (jinja2 sandbox with
trim_blocks and lstrip_blocks, loop controls, raise_exception), one user message plus the
generation prompt, and write the results as kedit's test vectors.

    pip install --target /tmp/jinja jinja2
    PYTHONPATH=/tmp/jinja python3 scripts/chat/make_vectors.py tests/fixtures/chat/templates.json \
        > tests/fixtures/chat/rendered.json

templates.json: {"<name>": {"template": str, "bos_token": str, "eos_token": str}}.
"""
import json
import sys

import jinja2
import jinja2.ext
from jinja2.sandbox import ImmutableSandboxedEnvironment

PROMPTS = [
    "The mother tongue of Danielle Darrieux is",
    "  What is the capital of France?  ",
    "Line one\nline two",
]


def raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def main(path):
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    out = {}
    for name, spec in json.load(open(path, encoding="utf-8")).items():
        template = env.from_string(spec["template"])
        out[name] = [
            {"prompt": p,
             "rendered": template.render(messages=[{"role": "user", "content": p}],
                                         add_generation_prompt=True,
                                         bos_token=spec["bos_token"], eos_token=spec["eos_token"])}
            for p in PROMPTS
        ]
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main(sys.argv[1])
