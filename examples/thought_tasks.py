"""The thought-patch study's tasks: lines ``x -> y``, at least 44 pairs each (4 shots, 16 training queries, 20+
held-out). Three have answers of several tokens on every tokenizer here (made-up suffix, uppercase, two-digit sums),
some others on some tokenizers (capitals such as Buenos Aires, French words)."""

from __future__ import annotations

import random

from transfer_study import ANTONYMS, CAPITALS, WORDS

NOUNS = ["cat", "dog", "tree", "house", "car", "book", "apple", "table", "chair", "door", "window", "road", "city",
         "cloud", "horse", "river", "stone", "bird", "ship", "train", "girl", "boy", "king", "queen", "ring", "song",
         "game", "lamp", "hill", "lake", "bell", "coat", "box", "bus", "glass", "dish", "baby", "story", "party",
         "leaf", "knife", "wolf", "child", "mouse", "foot", "tooth", "man", "woman"]
PLURALS = ["cats", "dogs", "trees", "houses", "cars", "books", "apples", "tables", "chairs", "doors", "windows",
           "roads", "cities", "clouds", "horses", "rivers", "stones", "birds", "ships", "trains", "girls", "boys",
           "kings", "queens", "rings", "songs", "games", "lamps", "hills", "lakes", "bells", "coats", "boxes", "buses",
           "glasses", "dishes", "babies", "stories", "parties", "leaves", "knives", "wolves", "children", "mice",
           "feet", "teeth", "men", "women"]
VERBS = [("walk", "walked"), ("jump", "jumped"), ("play", "played"), ("talk", "talked"), ("open", "opened"),
         ("call", "called"), ("help", "helped"), ("look", "looked"), ("want", "wanted"), ("ask", "asked"),
         ("work", "worked"), ("move", "moved"), ("live", "lived"), ("love", "loved"), ("start", "started"),
         ("stop", "stopped"), ("carry", "carried"), ("try", "tried"), ("cry", "cried"), ("go", "went"),
         ("see", "saw"), ("eat", "ate"), ("take", "took"), ("give", "gave"), ("come", "came"), ("run", "ran"),
         ("sing", "sang"), ("drink", "drank"), ("swim", "swam"), ("write", "wrote"), ("speak", "spoke"),
         ("break", "broke"), ("choose", "chose"), ("drive", "drove"), ("fly", "flew"), ("grow", "grew"),
         ("know", "knew"), ("throw", "threw"), ("draw", "drew"), ("buy", "bought"), ("think", "thought"),
         ("bring", "brought"), ("teach", "taught"), ("catch", "caught"), ("sell", "sold"), ("tell", "told"),
         ("find", "found"), ("make", "made")]
LANGUAGES = [("France", "French"), ("Germany", "German"), ("Italy", "Italian"), ("Spain", "Spanish"),
             ("Japan", "Japanese"), ("China", "Chinese"), ("Russia", "Russian"), ("Greece", "Greek"),
             ("Poland", "Polish"), ("Sweden", "Swedish"), ("Norway", "Norwegian"), ("Finland", "Finnish"),
             ("Denmark", "Danish"), ("Portugal", "Portuguese"), ("Netherlands", "Dutch"), ("Turkey", "Turkish"),
             ("Iran", "Persian"), ("Israel", "Hebrew"), ("Korea", "Korean"), ("Vietnam", "Vietnamese"),
             ("Thailand", "Thai"), ("Hungary", "Hungarian"), ("Ukraine", "Ukrainian"), ("Brazil", "Portuguese"),
             ("Mexico", "Spanish"), ("Egypt", "Arabic"), ("Iceland", "Icelandic"), ("Ireland", "Irish"),
             ("Austria", "German"), ("Argentina", "Spanish"), ("Indonesia", "Indonesian"), ("Romania", "Romanian"),
             ("Bulgaria", "Bulgarian"), ("Serbia", "Serbian"), ("Croatia", "Croatian"), ("Czechia", "Czech"),
             ("Slovakia", "Slovak"), ("Estonia", "Estonian"), ("Latvia", "Latvian"), ("Lithuania", "Lithuanian"),
             ("Albania", "Albanian"), ("Georgia", "Georgian"), ("Armenia", "Armenian"), ("Pakistan", "Urdu"),
             ("Kenya", "Swahili"), ("Cuba", "Spanish"), ("Peru", "Spanish"), ("Chile", "Spanish")]
FRENCH = [("cat", "chat"), ("dog", "chien"), ("house", "maison"), ("car", "voiture"), ("book", "livre"),
          ("sun", "soleil"), ("moon", "lune"), ("water", "eau"), ("fire", "feu"), ("tree", "arbre"),
          ("apple", "pomme"), ("bread", "pain"), ("milk", "lait"), ("cheese", "fromage"), ("door", "porte"),
          ("window", "fenêtre"), ("table", "table"), ("chair", "chaise"), ("city", "ville"), ("road", "route"),
          ("sea", "mer"), ("river", "rivière"), ("mountain", "montagne"), ("flower", "fleur"), ("bird", "oiseau"),
          ("fish", "poisson"), ("horse", "cheval"), ("cow", "vache"), ("king", "roi"), ("queen", "reine"),
          ("man", "homme"), ("woman", "femme"), ("child", "enfant"), ("friend", "ami"), ("school", "école"),
          ("day", "jour"), ("night", "nuit"), ("year", "année"), ("red", "rouge"), ("green", "vert"),
          ("blue", "bleu"), ("black", "noir"), ("white", "blanc"), ("big", "grand"), ("small", "petit"),
          ("hot", "chaud"), ("cold", "froid"), ("new", "nouveau")]


def sums(n: int = 48, seed: int = 1234) -> list[tuple[str, str]]:
    """Two-digit additions ``a + b`` with a two-digit sum (Mazzawi et al.'s arithmetic, in this format)."""
    rng = random.Random(seed)
    pairs: dict[str, str] = {}
    while len(pairs) < n:
        a, b = rng.randint(10, 49), rng.randint(10, 49)
        pairs[f"{a} + {b}"] = str(a + b)
    return list(pairs.items())


TASKS = {
    "capital": CAPITALS,
    "antonym": ANTONYMS,
    "made-up suffix": [(w, w + "zo") for w in WORDS],
    "uppercase": [(w, w.upper()) for w in WORDS],
    "plural": list(zip(NOUNS, PLURALS, strict=True)),
    "past tense": VERBS,
    "country -> language": LANGUAGES,
    "English -> French": FRENCH,
    "addition": sums(),
}
