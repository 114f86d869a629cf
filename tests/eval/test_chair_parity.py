"""Object HalBench word rules against RLHF-V's released evaluator, on hand-derived expectations.

Original: RLHF-V/RLHF-V eval/eval_gpt_obj_halbench.py at commit 8daac8a
https://github.com/RLHF-V/RLHF-V/blob/8daac8a8f30df123818ae9d3a0e3f0018497714c/eval/eval_gpt_obj_halbench.py
  L138-166  synonyms (first name = class) and the bigram table (multi-word synonyms, "home plate", "train track",
            "baby/adult {animal}", "passenger jet/train", "bow tie", "toilet seat", "wine glas")
  L184-200  get_double_words_only: only the bigram replacements of a name
  L202-239  caption_to_words: free text -> lemmas -> bigrams merged -> "seat" dropped next to "toilet" -> vocabulary
  L241-253  caption_objects_to_coco_objects: the "seat" rule and the vocabulary filter on extracted objects
  L390-404  postagging: runs of consecutive NN/NNS/NNP/NNPS tokens, their lemmas joined by spaces
  L406-435  get_pred_objs_match: spaCy on "a {name}"; its bigrams if any, else its noun runs; de-duplicated
  L437-545  compute_chair: CHAIRs, CHAIRs_refine (Resp.), CHAIRi (Mention), obj_rec

Each expectation below was worked out by hand from those rules (the spaCy tags assumed are the plain
ones for such short phrases: "a" DT, adjectives and participles JJ/VBN, modifying and head nouns NN/NNS).
"""

import pytest

from ddpo.eval.chair import ChairSample, chair_metrics, name_to_objects, names_to_mentions, text_to_mentions

# (extracted names of one answer, the COCO mentions RLHF-V keeps: (object, class) in order)
NAMES = [
    (["coffee cup"], []),  # NN NN: one object "coffee cup", not in the vocabulary -> no mention (not "cup")
    (["cup of coffee"], [("cup", "cup")]),  # two runs, "cup" and "coffee"; only "cup" is COCO
    (["red car", "parked car"], [("car", "car")]),  # JJ / VBN are not nouns; both give "car", de-duplicated
    (["glass table"], []),  # NN NN compound outside the vocabulary
    (["wooden dining table"], [("dining table", "dining table")]),  # a bigram: only the bigrams count
    (["man holding a tennis racket"], [("tennis racket", "tennis racket")]),  # the bigram hides "man"
    (["baseball player", "baseball bat"], [("baseball bat", "baseball bat")]),  # "baseball player" is no person
    (["baby elephant", "passenger train"], [("elephant", "elephant"), ("train", "train")]),  # bigram rules
    (["teddy bears", "wine glasses", "cell phones"], [("teddy bear",) * 2, ("wine glass",) * 2, ("cell phone",) * 2]),
    (["hot dogs", "dog", "dogs"], [("hot dog", "hot dog"), ("dog", "dog")]),  # plurals lemmatized, then de-duplicated
    (["man", "woman", "children"], [("man", "person"), ("woman", "person"), ("child", "person")]),  # 3 mentions
    (["toilet", "seat"], [("toilet", "toilet")]),  # "seat" dropped when "toilet" is among the objects
    (["seat"], [("seat", "chair")]),
    (["toilet seat"], [("toilet", "toilet")]),  # bigram -> toilet
    (["two dogs", "person's hand"], [("dog", "dog"), ("person", "person")]),  # CD and POS end noun runs
    (["remote control", "kitten", "cat"], [("remote control", "remote"), ("kitten", "cat"), ("cat", "cat")]),
    (["kitchen counter", "grass", "sky"], []),
]


@pytest.mark.parametrize("names, expected", NAMES)
def test_extracted_names_follow_rlhfv(names, expected):
    assert names_to_mentions(names) == expected


def test_noun_runs_before_the_vocabulary_filter():
    assert name_to_objects("cup of coffee") == ["cup", "coffee"]
    assert name_to_objects("coffee cup") == ["coffee cup"]
    assert name_to_objects("man's shirt") == ["man", "shirt"]
    assert name_to_objects("toilet seat") == ["toilet"] and name_to_objects("home plate") == ["home plate"]


# Free text (reference captions, or answers with --extractor rules): every occurrence is a mention, and the
# words of a compound are read one by one (caption_to_words keeps unmatched words).
TEXTS = [
    ("A man drinks from a coffee cup next to a hot dog.", ["person", "cup", "hot dog"]),
    ("Two teddy bears sit on a toilet seat.", ["teddy bear", "toilet"]),
    ("Wine glasses and a bottle on a dining table.", ["wine glass", "bottle", "dining table"]),
    ("A baby elephant follows an adult elephant.", ["elephant", "elephant"]),
    ("Children and their mother near a passenger jet.", ["person", "person", "airplane"]),
    ("A seat next to the toilet.", ["toilet"]),
    ("The skis of the skiers lean on a bench.", ["skis", "person", "bench"]),
]


@pytest.mark.parametrize("text, classes", TEXTS)
def test_free_text_follows_rlhfv(text, classes):
    assert [c for _, c in text_to_mentions(text)] == classes


def test_metrics_on_hand_scored_answers():
    """CHAIR over five answers' extracted names. By hand (compute_chair):
    A  coffee cup, man, dining table, laptop | GT person, dining table, cup -> man, dining table, laptop; 1 halluc.
    B  baseball player, baseball bat, baseball glove | GT person, baseball bat -> bat, glove; 1 halluc.
    C  cat, cats, kitten, couch, remote control | GT cat, couch -> cat, kitten, couch, remote; 1 halluc.
    D  kitchen counter, glass table | GT dining table -> no COCO mention (left out of CHAIRs_refine).
    E  children, kite, grass | GT person, kite -> child, kite; 0 halluc.
    CHAIRs 3/5; CHAIRs_refine 3/4; CHAIRi 3/11; obj_rec (2+1+2+0+2) / (3+2+2+1+2) = 7/10.
    The old last-word fallback would read "coffee cup" as cup, "baseball player" as a person and "glass table"
    as a table: CHAIRs_refine 3/5 and CHAIRi 3/14."""
    answers = [
        (["coffee cup", "man", "dining table", "laptop"], {"person", "dining table", "cup"}),
        (["baseball player", "baseball bat", "baseball glove"], {"person", "baseball bat"}),
        (["cat", "cats", "kitten", "couch", "remote control"], {"cat", "couch"}),
        (["kitchen counter", "glass table"], {"dining table"}),
        (["children", "kite", "grass"], {"person", "kite"}),
    ]
    samples = [ChairSample(names_to_mentions(names), gt, 10) for names, gt in answers]
    assert [len(s.mentions) for s in samples] == [3, 2, 4, 0, 2]
    assert [len(s.hallucinated) for s in samples] == [1, 1, 1, 0, 0]
    m = chair_metrics(samples)
    assert m["chair_s"] == pytest.approx(3 / 5)
    assert m["response_hallucination_rate"] == pytest.approx(3 / 4)
    assert m["mention_hallucination_rate"] == pytest.approx(3 / 11)
    assert m["recall"] == pytest.approx(7 / 10)
