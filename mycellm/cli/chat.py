"""The chat REPL's session: history, slash commands, and one streamed answer at a time."""

from __future__ import annotations

import time

import openai
from rich.console import Console


class ChatSession:
    def __init__(
        self,
        *,
        url: str,
        model: str,
        system: str | None,
        temperature: float,
        max_tokens: int,
        api_key: str | None = None,
    ) -> None:
        # The openai client needs some key; a node that takes callers without one ignores it.
        self._client = openai.OpenAI(base_url=url, api_key=api_key or "mycellm", max_retries=0)
        self.model = model
        self.system = system
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.history: list[dict[str, str]] = []

    def handle(self, line: str, console: Console) -> bool:
        """Act on one input line; False when the user asked to leave."""
        text = line.strip()
        if not text:
            return True
        if text.startswith("/"):
            return self._command(text, console)
        self.history.append({"role": "user", "content": text})
        answer = self._stream(console)
        if answer is None:
            self.history.pop()
        else:
            self.history.append({"role": "assistant", "content": answer})
        return True

    def _command(self, text: str, console: Console) -> bool:
        name, _, argument = text.partition(" ")
        if name in ("/exit", "/quit"):
            return False
        if name == "/reset":
            self.history.clear()
            console.print("[dim]history cleared[/dim]")
        elif name == "/model" and argument:
            self.model = argument.strip()
            console.print(f"[dim]model: {self.model}[/dim]")
        elif name == "/system":
            self.system = argument.strip() or None
            console.print(f"[dim]system prompt {'set' if self.system else 'cleared'}[/dim]")
        else:
            console.print("[dim]commands: /reset, /model NAME, /system TEXT, /exit[/dim]")
        return True

    def _stream(self, console: Console) -> str | None:
        messages = ([{"role": "system", "content": self.system}] if self.system else []) + self.history
        started = time.perf_counter()
        first: float | None = None
        parts: list[str] = []
        usage = None
        try:
            stream = self._client.chat.completions.create(  # type: ignore[call-overload]
                model=self.model,
                messages=messages,
                stream=True,
                stream_options={"include_usage": True},
                temperature=self.temperature,
                max_tokens=self.max_tokens,
            )
            for chunk in stream:
                if chunk.usage is not None:
                    usage = chunk.usage
                for choice in chunk.choices:
                    if choice.delta.content:
                        first = first or time.perf_counter()
                        parts.append(choice.delta.content)
                        console.print(choice.delta.content, end="", markup=False, highlight=False)
        except openai.APIError as error:
            console.print(f"\n[red]error: {error}[/red]")
            return None
        console.print()
        if usage is not None and first is not None:
            elapsed = time.perf_counter() - first
            rate = usage.completion_tokens / elapsed if elapsed > 0 else 0.0
            console.print(
                f"[dim]{usage.completion_tokens} tokens, first after {(first - started) * 1000:.0f} ms, {rate:.0f} tok/s[/dim]"
            )
        return "".join(parts)
