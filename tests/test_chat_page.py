"""The built-in chat page in a real browser: Debian's chromium driven by Playwright against a real
uvicorn server on the default model. Replies are short (a few tokens) to keep the file quick."""

import json
import os
import shutil
import time
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from server_harness import MODEL_NAME, RunningServer

from ropeway.engine import AsyncLLM

REPLY_SECONDS = 120_000  # Playwright counts milliseconds: the longest a short reply may take on a busy CPU
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "chat-page.png"
# Elements the Markdown renderer makes; anything else in a message came from model output as markup.
RENDERED_TAGS = {"div", "p", "br", "code", "pre", "span", "strong", "em", "a", "ul", "ol", "li", "h3", "h4", "h5",
                 "h6", "blockquote", "hr"}


def require_playwright():
    try:
        from playwright import sync_api
    except ImportError:
        if os.environ.get("CI"):
            pytest.fail("playwright is missing: pip install playwright (the test extra)", pytrace=False)
        pytest.skip("playwright is not installed (pip install playwright)", allow_module_level=True)
    return sync_api


def require_chromium() -> str:
    found = shutil.which("chromium")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is missing: apt-get install -y --no-install-recommends chromium")
        pytest.skip("chromium is not installed (apt-get install -y --no-install-recommends chromium)")
    return found


sync_api = require_playwright()
expect = sync_api.expect


@pytest.fixture(scope="module")
def engine(make_llm):
    llm = make_llm(max_model_len=1024, max_num_seqs=4, kv_cache_memory_bytes=128 << 20)
    async_engine = AsyncLLM.in_thread(llm.engine)
    async_engine.start()
    yield async_engine
    async_engine.shutdown()


@pytest.fixture(scope="module")
def server(engine):
    with RunningServer(engine) as running:
        yield running


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def browser():
    executable = require_chromium()
    with sync_api.sync_playwright() as playwright:
        # Chromium's sandbox refuses to start as root, as CI runs.
        launched = playwright.chromium.launch(executable_path=executable,
                                              args=["--no-sandbox"] if os.geteuid() == 0 else [])
        yield launched
        launched.close()


@pytest.fixture
def open_page(browser):
    """Opens the page of a server in a fresh browser context (its own local storage); fails the
    test on any uncaught error in the page's scripts."""
    contexts, errors = [], []

    def open_at(url: str):
        context = browser.new_context(viewport={"width": 1280, "height": 760}, accept_downloads=True)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: errors.append(error))
        response = page.goto(url)
        assert response.status == 200
        return page

    yield open_at
    for context in contexts:
        context.close()
    assert not errors, errors


@pytest.fixture
def page(open_page, server):
    page = open_page(server.url)
    expect(page.locator("#model-name")).to_have_text(MODEL_NAME)
    return page


def configure(page, **settings) -> None:
    """Fill the open conversation's settings form; keys are the inputs' names, "." spelled "__"."""
    for name, value in settings.items():
        field = page.locator(f'#settings-form [name="{name.replace("__", ".")}"]')
        if field.evaluate("node => node.tagName") == "SELECT":
            field.select_option(value)
        else:
            field.fill(value)


def start_turn(page, text: str) -> None:
    page.fill("#prompt", text)
    page.click("#send")
    expect(page.locator("#stop")).to_be_visible()


def send(page, text: str) -> None:
    """Send a message and wait for the whole reply. (A short reply can end before the Stop
    button is ever seen, so this waits for the new reply and the Send button instead.)"""
    replies = page.locator("#messages .message.assistant")
    before = replies.count()
    page.fill("#prompt", text)
    page.click("#send")
    expect(replies).to_have_count(before + 1, timeout=REPLY_SECONDS)
    expect(page.locator("#send")).to_be_visible(timeout=REPLY_SECONDS)


def last_reply(page):
    return page.locator("#messages .message.assistant .content").last


def stat(page, name: str) -> float | None:
    value = page.get_attribute(f"#stat-{name}", "data-value")
    return float(value) if value else None


def stored_conversations(page) -> list[dict]:
    return page.evaluate("JSON.parse(localStorage.getItem('ropeway.conversations'))")


def running_requests(url: str) -> float:
    families = text_string_to_metric_families(httpx.get(f"{url}/metrics").text)
    return sum(sample.value for family in families if family.name == "ropeway:num_requests_running"
               for sample in family.samples)


def test_reply_streams_token_by_token_and_equals_the_api_greedy_answer(page, client):
    question = "What is the capital of France?"
    answer = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": question}],
                                            max_tokens=10, temperature=0)
    expected = answer.choices[0].message.content
    configure(page, temperature="0", max_tokens="10")
    # Every text the reply shows on its way, as the browser renders it.
    page.evaluate("""() => {
        window.shown = [];
        new MutationObserver(() => {
            const replies = document.querySelectorAll('#messages .message.assistant .content');
            const text = replies.length ? replies[replies.length - 1].textContent : '';
            if (text && window.shown.at(-1) !== text) window.shown.push(text);
        }).observe(document.getElementById('messages'), {subtree: true, childList: true, characterData: true});
    }""")
    send(page, question)

    assert stored_conversations(page)[0]["messages"][-1] == {"role": "assistant", "content": expected}
    assert last_reply(page).text_content() == expected.strip()
    shown = page.evaluate("window.shown")
    assert len(shown) >= 3, shown  # token by token, not all at once
    assert all(later.startswith(earlier) and later != earlier for earlier, later in zip(shown, shown[1:])), shown
    # The stats panel: the server's counts for this very request, the page's own timing.
    assert stat(page, "conversation") == answer.usage.total_tokens
    assert stat(page, "trained") == 8192
    assert stat(page, "ttft") > 0 and stat(page, "speed") > 0

    page.click("#regenerate")  # streams the reply again, in place of the last one
    expect(page.locator("#send")).to_be_visible(timeout=REPLY_SECONDS)
    again = page.evaluate("window.shown")[len(shown):]
    assert len(again) >= 3 and again[-1] == expected.strip(), again
    assert [m["role"] for m in stored_conversations(page)[0]["messages"]] == ["user", "assistant"]


def test_stop_mid_stream_aborts_the_request(page, server):
    configure(page, temperature="0", max_tokens="400")
    start_turn(page, "Write a long story about a dragon who learns to bake bread.")
    page.wait_for_function("() => document.querySelector('#messages .message.assistant .content')"
                           ".textContent.length > 20", timeout=REPLY_SECONDS)
    assert running_requests(server.url) == 1
    page.click("#stop")
    expect(page.locator("#send")).to_be_visible()
    deadline = time.monotonic() + 10
    while running_requests(server.url) != 0:
        assert time.monotonic() < deadline, "the stopped request is still running"
        time.sleep(0.1)
    expect(page.locator("#messages .message.assistant")).to_have_class("message assistant stopped")
    stopped = stored_conversations(page)[0]["messages"][-1]
    assert stopped["stopped"] is True and len(stopped["content"]) > 20


@pytest.mark.slow
def test_sink_window_conversation_evicts_then_continues_from_the_retained_session(page):
    configure(page, temperature="0", max_tokens="24", policy__type="sink_window", policy__sinks="4",
              policy__window="64")
    expect(page.locator("#stat-window")).to_have_text("4 sinks + 64 window")
    questions = iter(["Name a large river in Europe.", "Which countries does it flow through?",
                      "Tell me about its source.", "Where does it end?", "Is it used for shipping?"])
    for question in questions:
        send(page, question)
        if stat(page, "evicted"):
            break
    evicted = stat(page, "evicted")
    assert evicted > 0
    # The cache holds at most sinks (a block) + window + one eviction chunk (a block) of the conversation.
    assert stat(page, "conversation") - evicted <= 16 + 64 + 16
    start_turn(page, next(questions))
    page.wait_for_function("() => [...document.querySelectorAll('#messages .message.assistant .content')]"
                           ".at(-1).textContent.length > 8", timeout=REPLY_SECONDS)
    shot = page.screenshot()  # mid-stream
    assert shot.startswith(b"\x89PNG") and len(shot) < 400_000
    if os.environ.get("ROPEWAY_UPDATE_SCREENSHOT"):  # regenerates the README's picture
        SCREENSHOT.write_bytes(shot)
    expect(page.locator("#send")).to_be_visible(timeout=REPLY_SECONDS)
    assert stat(page, "cached") > 0  # the turn went on from the retained session, not from the start
    assert stat(page, "evicted") > evicted


def test_model_output_with_a_script_tag_is_shown_as_text(page, client):
    cases = [("What does the HTML tag <script> do? Answer in one sentence.", 16, "p"),  # the tag in prose
             ("Show the HTML tag used to embed JavaScript, e.g. <script>.", 8, "pre code")]  # in a code block
    for question, max_tokens, holder in cases:
        expected = client.chat.completions.create(model=MODEL_NAME, messages=[{"role": "user", "content": question}],
                                                  max_tokens=max_tokens, temperature=0).choices[0].message.content
        assert "<script>" in expected  # the premise: the model writes the tag
        page.click("#new-conversation")
        configure(page, temperature="0", max_tokens=str(max_tokens))
        send(page, question)
        expect(last_reply(page).locator(holder)).to_contain_text("<script>")
        tags = page.evaluate("() => [...document.querySelectorAll('#messages *')].map(n => n.tagName.toLowerCase())")
        assert set(tags) <= RENDERED_TAGS, set(tags) - RENDERED_TAGS


@pytest.mark.parametrize("markdown, html", [
    ("# Title\n\nSome **bold**, *it* and `a <b>`.\nNext line\n\n- a\n- b\n\n3. x\n4. y\n\n> quoted\n\n---",
     "<h3>Title</h3><p>Some <strong>bold</strong>, <em>it</em> and <code>a &lt;b&gt;</code>.<br>Next line</p>"
     '<ul><li>a</li><li>b</li></ul><ol start="3"><li>x</li><li>y</li></ol><blockquote>quoted</blockquote><hr>'),
    ("```py\nprint('<script>')\n```\nafter", '<pre><span class="code-language">py</span><code data-language="py">'
     "print('&lt;script&gt;')</code></pre><p>after</p>"),
    ("```\nunclosed <b>, as mid-stream", "<pre><code>unclosed &lt;b&gt;, as mid-stream</code></pre>"),
    ('<img src=x onerror="window.pwned=1"><script>window.pwned=1</script>',
     '<p>&lt;img src=x onerror="window.pwned=1"&gt;&lt;script&gt;window.pwned=1&lt;/script&gt;</p>'),
    ("[a](javascript:window.pwned=1) [b](https://example.com/x)",
     '<p>[a](javascript:window.pwned=1) <a href="https://example.com/x" rel="noopener noreferrer" '
     'target="_blank">b</a></p>'),
    ("snake_case_name and 2 * 3 * 4", "<p>snake_case_name and 2 * 3 * 4</p>"),
])
def test_markdown_renderer_builds_elements_and_never_parses_markup(page, markdown, html):
    rendered = page.evaluate("""async (text) => {
        const { renderMarkdown } = await import('/static/markdown.js');
        const container = document.createElement('div');
        renderMarkdown(container, text);
        return container.innerHTML;
    }""", markdown)
    assert rendered == html
    assert page.evaluate("window.pwned") is None


def test_reload_keeps_the_conversation_its_settings_and_stats(page):
    configure(page, temperature="0", max_tokens="6", policy__type="sink_window", policy__window="512")
    send(page, "Say hello.")
    before = page.locator("#messages .message").all_text_contents()
    total = stat(page, "conversation")
    page.reload()
    expect(page.locator("#messages .message")).to_have_count(2)
    assert page.locator("#messages .message").all_text_contents() == before
    assert page.locator("#conversation-list li.open .title").text_content() == "Say hello."
    expect(page.locator('[name="policy.window"]')).to_have_value("512")
    assert stat(page, "conversation") == total


def test_conversations_rename_delete_export_and_import(page, tmp_path):
    exported = {"format": "ropeway-conversations", "version": 1, "conversations": [
        {"title": "Rivers", "messages": [{"role": "user", "content": "A river?"},
                                         {"role": "assistant", "content": "The **Danube**:\n```\nlength = 2850\n```"}],
         "settings": {"temperature": "0.5", "policy": {"type": "landmark", "retrieve": "32"}}},
        {"messages": [{"role": "user", "content": "Hello"}]},
    ]}
    upload = tmp_path / "conversations.json"
    upload.write_text(json.dumps(exported))
    page.set_input_files("#import-conversations", str(upload))
    expect(page.locator("#notice")).to_have_text("Imported 2 conversations.")
    expect(page.locator("#conversation-list li")).to_have_count(3)  # with the empty one the page opened
    expect(page.locator("#conversation-title")).to_have_text("Rivers")
    expect(page.locator("#messages .message.assistant strong")).to_have_text("Danube")
    expect(page.locator("#messages .message.assistant pre code")).to_have_text("length = 2850")
    expect(page.locator('[name="policy.retrieve"]')).to_be_visible()
    expect(page.locator('[name="temperature"]')).to_have_value("0.5")

    rivers = page.locator("#conversation-list li", has_text="Rivers")
    rivers.locator(".rename").click()
    page.fill("#conversation-list .rename-input", "European rivers")
    page.press("#conversation-list .rename-input", "Enter")
    expect(page.locator("#conversation-title")).to_have_text("European rivers")

    page.once("dialog", lambda dialog: dialog.accept())
    page.locator("#conversation-list li", has_text="Hello").locator(".delete").click()
    expect(page.locator("#conversation-list li")).to_have_count(2)

    with page.expect_download() as download:
        page.click("#export-conversations")
    saved = json.loads(Path(download.value.path()).read_text())
    titles = sorted(c["title"] for c in saved["conversations"])
    assert titles == ["", "European rivers"]

    upload.write_text('{"format": "something else"}')
    page.set_input_files("#import-conversations", str(upload))
    expect(page.locator("#notice")).to_contain_text("Import failed: not a ropeway conversations file")


def test_with_an_api_key_the_page_asks_for_it_and_sends_it(engine, open_page):
    with RunningServer(engine, api_key="sesame") as keyed:
        assert httpx.get(f"{keyed.url}/v1/models").status_code == 401  # the API still needs the key
        page = open_page(keyed.url)  # the page itself does not
        expect(page.locator("#api-key-dialog")).to_be_visible()
        page.fill("#api-key-input", "sesame")
        page.click("#api-key-submit")
        expect(page.locator("#model-name")).to_have_text(MODEL_NAME)
        configure(page, max_tokens="3")
        with page.expect_request("**/v1/chat/completions") as request:
            send(page, "Hi!")
        assert request.value.headers["authorization"] == "Bearer sesame"
        assert last_reply(page).text_content()
