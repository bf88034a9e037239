import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SNIPPET = "import json; from server.demo_model import build_byte_tokenizer; print(json.dumps(build_byte_tokenizer().get_vocab(), sort_keys=True))"


def test_byte_tokenizer_is_the_same_in_every_process():
    vocabs = [subprocess.run([sys.executable, "-c", SNIPPET], cwd=ROOT, capture_output=True, text=True, check=True).stdout
              for _ in range(3)]
    assert vocabs[0] == vocabs[1] == vocabs[2]
    vocab = json.loads(vocabs[0])
    assert len(vocab) == 259 and vocab["!"] == 0  # sorted byte alphabet, then <s>, </s>, <pad>
