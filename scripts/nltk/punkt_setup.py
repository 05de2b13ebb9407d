import functools
import punkt.data.english as e
import nltk.tokenize
from nltk.tokenize.punkt import PunktParameters, PunktSentenceTokenizer

def english_punkt():
    p = PunktParameters()
    p.abbrev_types = set(e.ABBREV_TYPES)
    p.collocations = set(e.COLLOCATIONS)
    p.sent_starters = set(e.SENT_STARTERS)
    for k, v in e.ORTHO_CONTEXT.items():
        p.ortho_context[k] = v
    return PunktSentenceTokenizer(p)

_tok = english_punkt()
nltk.tokenize._get_punkt_tokenizer = functools.lru_cache(lambda language="english": _tok)
