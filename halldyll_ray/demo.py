"""``halldyll demo``: every memory type stored, searched and turned into a prompt context.

Runs on whatever the settings say (by default the embedded PostgreSQL and packaged model);
it creates a fresh demo user each run so repeated runs do not collide.
"""

from __future__ import annotations

import time

from halldyll_ray.config import Settings
from halldyll_ray.engine import MemoryEngine
from halldyll_ray.models import (
    Conversation,
    Fact,
    FactKind,
    Image,
    ImageSize,
    Message,
    MessageRole,
    ModelKind,
    SearchResult,
    Segment,
    Summary,
    Transcription,
)


def _line(title: str) -> None:
    print(f"\n=== {title} " + "=" * max(0, 70 - len(title)))


def _scores(hit: SearchResult) -> str:
    """A hit's score and cosine. Two decimals printed a right hybrid answer as ``score=0.00``:
    the fused score of a small store is a few thousandths (see README "Search"), so it gets
    three significant digits, and the cosine, the number a reader can judge, comes beside it."""
    similarity = "" if hit.similarity is None else f" similarity={hit.similarity:.2f}"
    return f"score={hit.score:.3g}{similarity}"


async def run_demo(settings: Settings) -> None:
    started = time.perf_counter()
    async with MemoryEngine(settings) as engine:
        print(
            f"engine ready in {time.perf_counter() - started:.1f}s "
            f"(model {engine.encoder.model_id})"
        )
        user = await engine.create_user(f"demo-{int(time.time() * 1000)}", None, "user")
        try:
            llm = await engine.get_model("Qwen2.5-14B-Instruct")
        except Exception:
            llm = await engine.register_model("Qwen2.5-14B-Instruct", ModelKind.LLM, version="2.5")
        _line("store one memory of each type")
        stored = [
            await engine.store_memory(
                user.id,
                Fact(
                    statement="Ada drinks green tea every morning",
                    confidence=0.9,
                    source="onboarding",
                ),
            ),
            await engine.store_memory(
                user.id,
                Fact(
                    statement="Ada is learning Japanese for a trip",
                    kind=FactKind.EPHEMERAL,
                    confidence=0.4,
                ),
            ),
            await engine.store_memory(
                user.id,
                Conversation(
                    title="Planning the Kyoto trip",
                    model=llm.name,
                    session_id="demo-session",
                    messages=[
                        Message(
                            role=MessageRole.USER,
                            content="I want to see the temples in Kyoto in April.",
                        ),
                        Message(
                            role=MessageRole.ASSISTANT,
                            content="April is cherry blossom season; book early.",
                        ),
                    ],
                ),
            ),
            await engine.store_memory(
                user.id,
                Image(
                    prompt="a red fox in a snowy forest at dawn, photorealistic, 35mm",
                    negative_prompt="blurry, cartoon",
                    generator="RealVisXL_V5.0",
                    seed=1234,
                    steps=30,
                    guidance_scale=6.5,
                    size=ImageSize(width=1024, height=1024),
                    uri="s3://images/fox.png",
                ),
            ),
            await engine.store_memory(
                user.id,
                Transcription(
                    segments=[
                        Segment(start=0.0, end=3.2, text="Bonjour, c'est Ada."),
                        Segment(
                            start=3.2,
                            end=7.9,
                            text="Je rappelle pour la réservation du restaurant.",
                        ),
                    ],
                    duration_seconds=7.9,
                ),
            ),
        ]
        stored.append(
            await engine.store_memory(
                user.id,
                Summary(
                    text="Ada is preparing a spring trip to Japan and studies Japanese.",
                    covers=[stored[1].id, stored[2].id],
                ),
            )
        )
        again = await engine.store_memory(
            user.id, Fact(statement="ada drinks green tea every morning.", confidence=0.5)
        )
        for memory in stored:
            extra = ""
            if memory.type.value == "transcription":
                extra = f" language={memory.memory.language}"  # type: ignore[union-attr]
            print(f"{memory.type.value:<13} {memory.id}{extra}  {memory.text[:60]!r}")
        print(
            f"storing the tea fact again reinforced it: same id={again.id == stored[0].id}, "
            f"confidence {again.memory.confidence:.2f}, "  # type: ignore[union-attr]
            f"reinforcements={again.reinforcement_count}"
        )

        _line("search (paraphrased queries)")
        for query in (
            "what does Ada drink when she wakes up?",
            "the picture of the fox",
            "restaurant booking call",
            "where is she travelling?",
        ):
            started = time.perf_counter()
            hits = await engine.search(user.id, query, limit=2)
            took = (time.perf_counter() - started) * 1000
            best = hits[0] if hits else None
            shown = (
                f"{best.memory.type.value} {_scores(best)} "
                f"[{best.matched.part} {best.matched.index}] {best.matched.text[:50]!r}"
                if best
                else "nothing"
            )
            print(f"{query!r:<45} -> {shown}  ({took:.0f} ms)")

        _line("agent loop: record turns, then prepare the next prompt")
        for user_message, answer in (
            ("My favourite food is ramen. I live in Lyon.", "Ramen in Kyoto is great."),
            ("I prefer quiet places in the morning.", "Then visit the temples at 7am."),
        ):
            turn = await engine.record_turn(user.id, "demo-chat", user_message, answer)
            print(f"recorded turn {turn.message_seqs}, candidate facts: {len(turn.fact_ids)}")
        context = await engine.prepare_context(
            user.id, "demo-chat", "Any breakfast ideas for my trip?", max_tokens=220
        )
        print(context.text)
        print(
            f"-- {context.token_count}/{context.max_tokens} tokens, "
            f"sources: {[str(s)[:8] for s in context.sources]}"
        )
