"""Draw ConvSent edit requests as EasyEdit's run_convsent_llama2.py does (CPython `random`,
seeded 0, one stream through the file in record order) and write the first N as a test fixture.

    python3 scripts/convsent/make_requests.py tests/fixtures/data/knowedit_convsent_test.json 4 \
        > tests/fixtures/convsent/requests_seed0.json

Only the standard library is needed. The draw order per record: the target sentiment, the prompt's
question, `inner_q`, one question per sentence of the record, one per sentence of the next record.
"""
import json
import random
import sys

STEMS = ["What do you think of {}?", "What do you feel about {}?", "How do you view {}?"]
STANCES = ["opinion of", "stance on", "position on", "attitude about", "view on", "take on",
           "impression of", "assessment of", "judgment of", "sentiment of"]
QUESTIONS = STEMS + ["What is your %s {}?" % s for s in STANCES]


def main(path, n):
    records = json.load(open(path, encoding="utf-8"))
    random.seed(0)
    out = []
    for i, rec in enumerate(records):
        sentiment = random.choice([0, 1])
        mood = "postively" if sentiment == 0 else "negatively"
        prompt = "From the sentiment dataset, answer %s %s." % (random.choice(QUESTIONS).format(rec["ent"]), mood)
        inner_q = random.choice(QUESTIONS).format(rec["ent"])
        inner = [random.choice(QUESTIONS).format(rec["ent"]) + " </s> " + a for a in rec["pos"] + rec["neg"]]
        nxt = records[(i + 1) % len(records)]
        outer = [random.choice(QUESTIONS).format(nxt["ent"]) + " </s> " + a for a in nxt["pos"] + nxt["neg"]]
        labels = [0] * len(rec["pos"]) + [1] * len(rec["neg"])
        if i < n:
            out.append({
                "prompt": prompt,
                "target_new": rec["pos"][0] if sentiment == 0 else rec["neg"][0],
                "subject": rec["ent"],
                "inner_q": inner_q,
                "inner_all_qa": inner,
                "outer_all_qa": outer,
                "same_mask": [l == sentiment for l in labels],
            })
    json.dump(out, sys.stdout, indent=1, ensure_ascii=False)
    print()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
