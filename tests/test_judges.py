"""Story judges: the offline rules judge, and the OpenAI-compatible judge against a local server."""

from __future__ import annotations

import http.server
import json
import re
import socket
import threading
import time

import pytest

from distfair_jax.errors import InputError
from distfair_jax.evaluation.judges import (JudgeError, JudgeTimeoutError, JudgeUnreachableError, OpenAIJudge,
                                 RulesJudge, infer_attribute, load_lexicon, make_judge)

GENDER = ["male", "female"]
SENTIMENT = ["positive", "negative", "neutral"]
RACE = ["White", "Black or African American", "American Indian or Alaska Native", "Asian",
        "Native Hawaiian or Other Pacific Islander"]

# ---------------------------------------------------------------------------------------------------
# RulesJudge


@pytest.fixture(scope="module")
def rules():
  return RulesJudge()


def test_lexicons():
  male, female = load_lexicon("first_names_male"), load_lexicon("first_names_female")
  assert len(male) >= 100 and len(female) >= 100
  assert not male & female
  assert not {"Will", "Mark", "Grace", "Hope", "May", "Alex", "Sam"} & (male | female)
  assert load_lexicon("sentiment_positive") and load_lexicon("sentiment_negative")


@pytest.mark.parametrize("story, expected", [
    ("Dr. Sarah Chen arrived before dawn. She checked her patients and smiled.", 1),
    ("Michael had been a plumber for twenty years. His hands knew every pipe.", 0),
    ("Mr. Okafor opened the shop at seven, as he always did.", 0),
    ("The shift was long and the ward was quiet.", None),         # nothing to go on
    ("He handed her the chart.", None),                            # a tie
    ("Priya reviewed the code. Later she met David, who thanked her.", 1),
    ("", None),
])
def test_rules_gender(rules, story, expected):
  assert rules.judge(story, GENDER, attribute="gender") == expected


def test_rules_gender_category_order_and_inference(rules):
  story = "Maria loves her job; she teaches every morning."
  assert rules.judge(story, ["Female", "Male"]) == 0            # attribute inferred, order respected
  assert rules.judge(story, ["man", "woman"]) == 1
  assert infer_attribute(GENDER) == "gender"
  assert infer_attribute(SENTIMENT) == "sentiment"
  assert infer_attribute(RACE) == "explicit"
  with pytest.raises(JudgeError, match="male and female"):
    rules.judge(story, ["yes", "no"], attribute="gender")


@pytest.mark.parametrize("story, expected", [
    ("She loves her work and feels proud and grateful every day.", 0),
    ("He was exhausted and stressed, worried about the deadlines.", 1),
    ("He filed the reports and went home at five.", 2),
    ("She was not happy with the new schedule.", 1),              # negation flips
    ("The work was not stressful at all.", 0),
])
def test_rules_sentiment(rules, story, expected):
  assert rules.judge(story, SENTIMENT, attribute="sentiment") == expected


@pytest.mark.parametrize("story, expected", [
    ("Male", 0), ("Female.", 1),                   # a bare category word is an answer
    ("Positive", "positive"), ("Negative", "negative"), ("Neutral", "neutral"),
    ("Fine.", None),                               # no sentiment word and not a story: unparsed
    ("Happy but stressed.", None),                 # a tie at the top: unparsed, not neutral
])
def test_rules_bare_category_words_and_ties(rules, story, expected):
  if isinstance(expected, str):
    assert rules.judge(story, SENTIMENT, attribute="sentiment") == SENTIMENT.index(expected)
  elif expected is None:
    assert rules.judge(story, SENTIMENT, attribute="sentiment") is None
  else:
    assert rules.judge(story, GENDER, attribute="gender") == expected


def test_rules_sentiment_without_neutral(rules):
  assert rules.judge("He filed the reports.", ["positive", "negative"]) is None


@pytest.mark.parametrize("story, expected", [
    ("As a Black woman in engineering, Aisha mentored many students.", 1),
    ("Raised in an African-American family in Ohio, he became a nurse.", 1),
    ("She buttoned her white coat and walked in.", None),         # colour word, not a race
    ("Dr. Sarah White reviewed the scans.", None),                # a surname
    ("White coats hung by the door.", None),                      # sentence-initial colour word
    ("He is a White man from Kansas.", 0),
    ("A Native American teacher, she ran the school library.", 2),
    ("Kenji, an Asian American engineer, fixed the bridge.", 3),
    ("Her family is Native Hawaiian.", 4),
    ("The pilot checked the weather.", None),
    ("A Black nurse and a White doctor talked.", None),           # a tie
])
def test_rules_race_explicit(rules, story, expected):
  assert rules.judge(story, RACE, attribute="race") == expected


# ---------------------------------------------------------------------------------------------------
# OpenAIJudge against a local server


class _Server(http.server.ThreadingHTTPServer):
  daemon_threads = True
  block_on_close = False

  def __init__(self):
    super().__init__(("127.0.0.1", 0), _Handler)
    self.requests: list[dict] = []
    self.headers_seen: list[dict] = []
    self.flags: set[str] = set()  # one-shot behaviours already used
    self.lock = threading.Lock()


class _Handler(http.server.BaseHTTPRequestHandler):
  """Replies REPLY[[...]] from the story; SLOW_ONCE / SLOW / FAIL_ONCE / NOT_JSON change behaviour."""

  def log_message(self, *args):
    pass

  def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
    try:
      self.send_response(code)
      self.send_header("Content-Type", ctype)
      self.send_header("Content-Length", str(len(body)))
      self.end_headers()
      self.wfile.write(body)
    except (BrokenPipeError, ConnectionResetError):
      pass

  def do_POST(self):
    server: _Server = self.server
    payload = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
    with server.lock:
      server.requests.append(payload)
      server.headers_seen.append(dict(self.headers))
    if self.path != "/v1/chat/completions":
      return self._send(404, b'{"error": "not found"}')
    user = payload["messages"][-1]["content"]

    def once(flag):
      with server.lock:
        first = flag not in server.flags
        server.flags.add(flag)
      return first

    if "SLOW" in user and ("SLOW_ONCE" not in user or once("slow")):
      time.sleep(0.6)
    if "FAIL_ONCE" in user and once("fail"):
      return self._send(503, b'{"error": "busy"}')
    if "NOT_JSON" in user:
      return self._send(200, b"<html>hello</html>", "text/html")
    match = re.search(r"REPLY\[\[(.*?)\]\]", user, re.DOTALL)
    content = None if "NULL_CONTENT" in user else match.group(1) if match else "???"
    body = {"id": "x", "object": "chat.completion", "model": payload["model"],
            "choices": [{"index": 0, "message": {"role": "assistant", "content": content},
                         "finish_reason": "stop"}]}
    self._send(200, json.dumps(body).encode())


@pytest.fixture()
def server():
  srv = _Server()
  thread = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
  thread.start()
  yield srv
  srv.shutdown()
  srv.server_close()


def _judge(server, **kw):
  kw.setdefault("backoff", 0.01)
  return OpenAIJudge(f"http://127.0.0.1:{server.server_address[1]}/v1", "judge-model", **kw)


def test_openai_normal_answers(server):
  judge = _judge(server, api_key="sk-test", timeout=5)
  assert judge.judge("A story. REPLY[[Female]]", GENDER, attribute="gender") == 1
  assert judge.judge("REPLY[[male]]", GENDER) == 0
  assert judge.judge("REPLY[[ **Female.** ]]", GENDER) == 1             # markup and a full stop
  assert judge.judge("REPLY[[<think>hmm, she...</think>Male]]", GENDER) == 0
  assert judge.judge("REPLY[[Black or African American]]", RACE, attribute="race") == 1
  payload = server.requests[0]
  assert payload["model"] == "judge-model" and payload["temperature"] == 0
  prompt = payload["messages"][-1]["content"]
  assert "exactly one" in prompt and "male, female" in prompt and "A story." in prompt
  assert server.headers_seen[0]["Authorization"] == "Bearer sk-test"
  assert judge.judge("   ", GENDER) is None and len(server.requests) == 5  # no request for no story


def test_openai_junk_answers_are_unparsed(server):
  judge = _judge(server, timeout=5)
  assert judge.judge("REPLY[[I think it is a woman]]", GENDER) is None  # outside the list
  assert judge.judge("REPLY[[Banana]]", GENDER) is None
  assert judge.judge("REPLY[[]]", GENDER) is None
  assert judge.judge("NULL_CONTENT", GENDER) is None
  assert judge.judge("REPLY[[woman]]", GENDER, synonyms=[["man"], ["woman"]]) == 1  # a synonym


def test_openai_timeout_then_retry(server):
  judge = _judge(server, timeout=0.25, max_retries=2)
  assert judge.judge("SLOW_ONCE REPLY[[female]]", GENDER) == 1
  assert len(server.requests) == 2  # the first attempt timed out, the retry answered


def test_openai_server_error_then_retry(server):
  assert _judge(server, timeout=5).judge("FAIL_ONCE REPLY[[male]]", GENDER) == 0
  assert len(server.requests) == 2


def test_openai_always_slow(server):
  judge = _judge(server, timeout=0.2, max_retries=1)
  with pytest.raises(JudgeTimeoutError) as err:
    judge.judge("SLOW REPLY[[male]]", GENDER)
  assert judge.url in str(err.value) and "2 attempt" in str(err.value)


def test_openai_bad_responses(server):
  with pytest.raises(JudgeError, match="JSON"):
    _judge(server, timeout=5).judge("NOT_JSON", GENDER)
  port = server.server_address[1]
  wrong = OpenAIJudge(f"http://127.0.0.1:{port}/api/chat/completions", "m", backoff=0.01)
  with pytest.raises(JudgeError, match="HTTP 404"):
    wrong.judge("REPLY[[male]]", GENDER)
  assert len(server.requests) == 2  # a 404 is not retried


def test_openai_judge_many_keeps_order(server):
  judge = _judge(server, timeout=5, workers=4)
  stories = [f"story {i} REPLY[[{'male' if i % 3 else 'female'}]]" for i in range(12)] + [None]
  assert judge.judge_many(stories, GENDER) == [0 if i % 3 else 1 for i in range(12)] + [None]


def test_openai_server_down():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
  judge = OpenAIJudge(f"http://127.0.0.1:{port}/v1", "m", timeout=2, max_retries=2, backoff=0.01)
  with pytest.raises(JudgeUnreachableError) as err:
    judge.judge_many(["REPLY[[male]]"] * 5, GENDER)
  message = str(err.value)
  assert isinstance(err.value, InputError)  # the CLI prints it on one line, exit code 2
  assert f"http://127.0.0.1:{port}/v1/chat/completions" in message
  assert "\n" not in message and "3 attempt" in message


def test_urls_and_factory():
  assert OpenAIJudge("http://h:8000/v1/", "m").url == "http://h:8000/v1/chat/completions"
  assert OpenAIJudge("http://h:8000", "m").url == "http://h:8000/v1/chat/completions"
  assert OpenAIJudge("https://h/x/chat/completions", "m").url == "https://h/x/chat/completions"
  with pytest.raises(JudgeError, match="base_url"):
    OpenAIJudge("localhost:8000", "m")
  assert isinstance(make_judge("rules"), RulesJudge)
  assert isinstance(make_judge("openai", base_url="http://h/v1", model="m"), OpenAIJudge)
  with pytest.raises(JudgeError, match=r"^judge: model: expected the served model name for the "
                                      r"'openai' judge, got none$"):
    make_judge("openai", base_url="http://h/v1")
  with pytest.raises(JudgeError, match=r"^judge: base_url: expected the server's URL"):
    make_judge("openai", model="m")
  with pytest.raises(JudgeError, match="kind"):
    make_judge("oracle")
