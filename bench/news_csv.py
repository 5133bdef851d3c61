"""A news-topic file the way users bring their own data: no header, three columns (class id, title,
description), written by Python's csv module, with quotes and tabs inside fields. Issue 23's case,
reproduced without any dataset download: English sentences from topic phrase lists, four classes as
AG News numbers them (1 World, 2 Sports, 3 Business, 4 Sci/Tech), some phrases shared between topics
so that the task is not trivially separable.

    python -m bench.news_csv --out /tmp/news.csv
    tierserve build --data /tmp/news.csv --no-header --label-column 0 --text-column 1,2 \\
        --labels 1=World,2=Sports,3=Business,4=Sci/Tech
    tierserve demo --artifacts artifacts/news
"""

from __future__ import annotations

import argparse
import csv
import random
from pathlib import Path

TOPICS = {
    "1": ["the prime minister", "parliament", "the embassy", "a ceasefire", "the election", "rebel forces",
          "the united nations", "a peace treaty", "the foreign ministry", "border clashes", "refugees",
          "the opposition leader", "diplomats", "a state visit", "protesters in the capital"],
    "2": ["the striker", "the home team", "the coach", "a late goal", "the championship", "the league leaders",
          "the quarterback", "a world record", "the tennis final", "the season opener", "fans in the stadium",
          "the grand prix", "the olympic team", "a hat trick", "the transfer window"],
    "3": ["shares", "quarterly profit", "the central bank", "investors", "the merger", "oil prices",
          "the stock market", "retail sales", "the chief executive", "interest rates", "a takeover bid",
          "bond yields", "the trade deficit", "earnings forecasts", "the airline"],
    "4": ["the software maker", "researchers", "a new chip", "the internet", "a space probe", "the smartphone",
          "hackers", "the search engine", "a genome study", "broadband", "the operating system",
          "a telescope", "cloud computing", "the satellite", "a security flaw"],
}
SHARED = ["the company", "officials", "the government", "analysts", "a report", "the deal", "the agency",
          "the announcement", "the plan", "critics"]
VERBS = ["said on monday", "announced", "warned", "reported", "confirmed", "denied", "expected", "welcomed",
         "rejected", "unveiled", "questioned", "praised"]
ENDINGS = ["after talks", "amid concerns", "despite pressure", "for the first time", "this week",
           "on tuesday", "in a statement", "ahead of the vote", "late on friday", "as expected"]


def sentence(rng: random.Random, topic: str, share: float) -> str:
    """A subject, a verb, an object and an ending; each noun phrase from another topic with chance `share`."""
    def phrase() -> str:
        roll = rng.random()
        if roll < share:
            return rng.choice(TOPICS[rng.choice([t for t in TOPICS if t != topic])])
        if roll < share + 0.25:
            return rng.choice(SHARED)
        return rng.choice(TOPICS[topic])
    return f"{phrase()} {rng.choice(VERBS)} {phrase()} {rng.choice(ENDINGS)}"


def rows(n: int, seed: int = 0, share: float = 0.3) -> list[list[str]]:
    rng = random.Random(seed)
    out = []
    for i in range(n):
        topic = rng.choice(sorted(TOPICS))
        title = sentence(rng, topic, share).split(" said")[0].title()
        description = sentence(rng, topic, share) + "."
        if i % 3 == 0:
            description = f'"{description}" {rng.choice(["she said", "he added", "a spokesman said"])}'
        if i % 5 == 0:
            description = f"{description}\t(Reuters)"  # a tab inside a field
        out.append([topic, title, description])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("news.csv"), help="the file to write (default %(default)s)")
    parser.add_argument("--rows", type=int, default=6000, help="rows to write (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="draw (default %(default)s)")
    parser.add_argument("--delimiter", choices=["comma", "tab"], default="comma",
                        help="comma: a CSV; tab: a TSV, fields with tabs quoted (default %(default)s)")
    args = parser.parse_args()
    with open(args.out, "w", newline="", encoding="utf-8") as f:
        csv.writer(f, delimiter="," if args.delimiter == "comma" else "\t").writerows(rows(args.rows, args.seed))
    print(f"wrote {args.rows} rows to {args.out} (no header: class id, title, description)")


if __name__ == "__main__":
    main()
