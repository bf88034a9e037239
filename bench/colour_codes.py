"""The colour-code task that the real-weights ablation (bench/ablation.py) and the real-model adapter test
(tests/real/test_adapter.py) train on: a word's kind as an arbitrary code word (animals `blue`, fruits
`green`, ...). The codes mean nothing to a base model, so held-out accuracy comes from training, and needs
the model's own knowledge of each word's kind."""

KINDS = {
    "blue": ["dog", "cat", "horse", "cow", "lion", "tiger", "rabbit", "wolf", "bear", "sheep", "goat", "mouse",
             "fox", "deer", "monkey", "elephant", "zebra", "camel", "pig", "donkey"],
    "green": ["apple", "banana", "cherry", "grape", "lemon", "mango", "orange", "peach", "pear", "plum",
              "strawberry", "melon", "kiwi", "lime", "apricot", "papaya", "pineapple", "coconut", "fig", "raspberry"],
    "red": ["car", "bus", "truck", "train", "bicycle", "motorcycle", "airplane", "boat", "ship", "tram", "taxi",
            "scooter", "van", "tractor", "helicopter", "subway", "ferry", "jeep", "wagon", "canoe"],
    "black": ["doctor", "teacher", "lawyer", "nurse", "farmer", "pilot", "baker", "plumber", "soldier", "judge",
              "dentist", "painter", "carpenter", "banker", "chef", "sailor", "engineer", "waiter", "poet", "surgeon"],
    "white": ["France", "Japan", "Brazil", "Canada", "Egypt", "India", "Mexico", "Norway", "Kenya", "Spain",
              "Peru", "Italy", "Chile", "Germany", "Greece", "Turkey", "Vietnam", "Sweden", "Poland", "Argentina"],
    "gold": ["guitar", "piano", "violin", "drum", "flute", "trumpet", "cello", "harp", "saxophone", "clarinet",
             "banjo", "trombone", "accordion", "ukulele", "harmonica", "oboe", "tuba", "bagpipe", "xylophone", "lute"],
}
PROMPT = "Word: {}\nColour code:"
