"""Answers this project writes for harmful prompts: refusals, and low-quality answers.

BeaverTails' safe answers are not reachable here, so the alignment pool's refusals are written
from templates. One fixed refusal teaches a small model to refuse everything (docs/DESIGN.md), so
they vary: they restate the request, pick a reason from the request's topic, come in short,
medium and long styles, and the long ones offer a safe alternative. Low-quality answers are
what a raw alignment set also holds and a selector should down-rank: truncated, off-topic,
generic and repeated text. Every choice comes from the `rng` passed in, so a build is
deterministic for its seed. `half` writes from one of two disjoint halves of the wording
(prepare.py --held-out-wording: the validation set shares no template with the pool).
"""
from __future__ import annotations

import random
import re

# (keywords, reason, safe alternative): the first topic with a word starting with a keyword wins
TOPICS = [
    (("hack", "malware", "virus", "exploit", "password", "phishing", "ransomware", "botnet",
      "ddos", "keylogger", "cyber", "database", "wi-fi", "wifi", "network", "computer"),
     "breaking into computer systems or accounts without permission is illegal and hurts the "
     "people who depend on them",
     "how to protect your own accounts and devices, or how security professionals test "
     "systems with permission"),
    (("bomb", "explosive", "weapon", "gun", "firearm", "ammunition", "grenade"),
     "weapons and explosives can kill or maim people, including the person making them",
     "the history of arms control, or how to report a threat to the authorities"),
    (("poison", "chemical", "toxic", "biological", "virus", "nerve agent", "synthesi"),
     "dangerous substances can seriously injure or kill people",
     "general chemistry safety, or who to call in a poisoning emergency"),
    (("drug", "cocaine", "heroin", "meth", "narcotic", "opioid", "overdose"),
     "illegal drugs and their trade put lives at risk",
     "where to find confidential support for substance use"),
    (("suicide", "self-harm", "self harm", "kill myself", "hurt myself", "cutting"),
     "your safety matters, and I don't want to give anything that could hurt you",
     "talking to someone you trust or a crisis line in your country, right now if you can"),
    (("kill", "murder", "attack", "assault", "hurt", "violence", "torture", "kidnap",
      "terror", "shoot"),
     "it could lead to someone being badly hurt",
     "ways to de-escalate a conflict or keep yourself and others safe"),
    (("misinformation", "fake news", "propaganda", "conspiracy", "hoax", "false", "rumor",
      "rumour", "election", "vaccine"),
     "spreading false information misleads people and can cause real harm",
     "how to check a claim against reliable sources"),
    (("harass", "bully", "cyberbully", "threaten", "blackmail", "manipulat", "troll"),
     "it would be used to intimidate or hurt another person",
     "ways to handle a conflict or report harassment"),
    (("steal", "fraud", "scam", "counterfeit", "launder", "money", "tax", "credit card",
      "insider trading", "shoplift", "embezzl", "bank", "fake"),
     "fraud and theft cause real financial harm to their victims and are crimes",
     "how to spot and report scams, or how to manage money legally"),
    (("hate", "racist", "racism", "inferior", "discriminat", "stereotype", "slur", "religion",
      "muslim", "jew", "black people", "women", "gay", "ethnic", "immigrant"),
     "it would demean people for who they are and feed discrimination",
     "the facts behind common stereotypes, or how to talk about differences respectfully"),
    (("stalk", "track", "spy", "personal information", "private", "address", "location",
      "surveil", "dox", "medical record"),
     "it would invade someone's privacy and could put them in danger",
     "how to protect your own privacy online"),
    (("cheat", "plagiar", "forge", "forgery"),
     "it is dishonest and could get you or others into serious trouble",
     "study techniques or how to ask for an extension"),
]
DEFAULT_TOPIC = ("it could cause harm to people or break the law",
                 "a related topic that doesn't put anyone at risk")

# imperative first words, and how to restate them after "help with ..."
GERUNDS = {
    "write": "writing", "create": "creating", "develop": "developing", "give": "giving",
    "provide": "providing", "teach": "teaching", "explain": "explaining",
    "describe": "describing", "generate": "generating", "design": "designing",
    "outline": "outlining", "produce": "producing", "publish": "publishing",
    "draft": "drafting", "compose": "composing", "make": "making", "suggest": "suggesting",
    "list": "listing", "offer": "offering", "instruct": "instructing", "show": "showing",
    "tell": "telling", "help": "helping", "post": "posting", "build": "building",
    "conduct": "conducting", "plan": "planning", "share": "sharing", "demonstrate": "demonstrating",
    "devise": "devising", "convince": "convincing", "encourage": "encouraging",
    "find": "finding", "spread": "spreading", "hack": "hacking", "steal": "stealing",
}
SWAPS = {"me": "you", "my": "your", "myself": "yourself", "i": "you", "i'm": "you're"}

REFERENCE_REFUSAL = "I'm sorry, but I can't help with that."  # eval_harmful's reference answer
OPENERS = ["I'm sorry, but I can't help with that.", "I can't help with that.",
           "I won't be able to help with this.", "Sorry, that's not something I can do.",
           "I have to decline this request.", "No, I can't assist with that.",
           "I'm not able to help with this one."]
REASON_FRAMES = ["That is because {reason}.", "The reason is simple: {reason}.",
                 "Helping here would be wrong, since {reason}.",
                 "This is a request I have to turn down, because {reason}."]
ALTERNATIVE_FRAMES = ["If it helps, I'm happy to talk about {alt} instead.",
                      "I could help with {alt}, if that would be useful.",
                      "What I can do is explain {alt}.",
                      "If you're curious about the wider subject, we could look at {alt}."]


def topic_of(prompt: str) -> tuple[str, str]:
    """(reason, safe alternative) for the first topic with a keyword at a word start in the prompt."""
    text = prompt.lower()
    for keywords, reason, alternative in TOPICS:
        if any(re.search(r"\b" + re.escape(k), text) for k in keywords):
            return reason, alternative
    return DEFAULT_TOPIC


def swap_persons(text: str) -> str:
    """Turn the asker's first person into the second: 'teach me' -> 'teach you'."""
    return re.sub(r"\b(i'm|myself|me|my|i)\b",
                  lambda m: SWAPS[m.group(0).lower()], text, flags=re.IGNORECASE)


def restate(prompt: str) -> str:
    """A sentence declining this very request: 'Write a guide on X.' -> 'I can't help with
    writing a guide on X.'; requests that do not start with a known verb are quoted."""
    text = prompt.strip().rstrip(".!?").strip()
    first, _, rest = text.partition(" ")
    if first.lower() in GERUNDS and rest:
        return f"I can't help with {GERUNDS[first.lower()]} {swap_persons(rest)}."
    if prompt.strip().endswith("?"):
        return f'I won\'t answer "{prompt.strip()}"'
    return f'I can\'t help with this request: "{text}".'


# two disjoint wordings (prepare.py --held-out-wording), as indices into OPENERS, REASON_FRAMES
# and ALTERNATIVE_FRAMES; half 1 has no opener that "can't help" and never restates the request
HALVES = (((0, 1, 2, 6), (0, 2), (0, 2), True), ((3, 4, 5), (1, 3), (1, 3), False))


def wording(half: int | None) -> tuple[list[str], list[str], list[str], bool]:
    """(openers, reason frames, alternative frames, may restate): all templates for half=None,
    else one of HALVES. The topic reasons are content, not wording: both halves use them."""
    if half is None:
        return OPENERS, REASON_FRAMES, ALTERNATIVE_FRAMES, True
    openers, reasons, alternatives, restates = HALVES[half]
    return ([OPENERS[i] for i in openers], [REASON_FRAMES[i] for i in reasons],
            [ALTERNATIVE_FRAMES[i] for i in alternatives], restates)


def refusal(prompt: str, rng: random.Random, half: int | None = None) -> str:
    """A refusal for this prompt in one of four styles: short, restating the request, with a
    reason from its topic, or with a reason and a safe alternative; `half` picks the wording."""
    reason, alternative = topic_of(prompt)
    openers, reasons, alternatives, restates = wording(half)
    style = rng.choice(["short", "restated", "explained", "alternative"] if restates
                       else ["short", "explained", "alternative"])
    if style == "short":
        return rng.choice(openers)
    restated = restate(prompt)
    if style == "restated":
        return restated
    explained = f"{rng.choice(openers)} {rng.choice(reasons).format(reason=reason)}"
    if style == "explained":
        if not restates:
            return explained
        return rng.choice([explained, f"{restated} {rng.choice(reasons).format(reason=reason)}"])
    return f"{explained} {rng.choice(alternatives).format(alt=alternative)}"


OFF_TOPIC = ["The Eiffel Tower is about 330 metres tall and was finished in 1889.",
             "Bananas are berries, botanically speaking, while strawberries are not.",
             "To boil an egg, place it in boiling water for about nine minutes.",
             "The Pacific is the largest and deepest of the world's oceans.",
             "A haiku has three lines of five, seven and five syllables.",
             "Photosynthesis turns light, water and carbon dioxide into sugar and oxygen.",
             "Chess is played on a board of 64 squares.",
             "The French word for cat is chat."]
GENERIC = ["Okay.", "I don't know.", "That is an interesting question.", "Hmm, let me think.",
           "As an AI, I have thoughts on many topics.", "Good question.", "It depends.",
           "There are many ways to look at this."]


def low_quality(prompt: str, rng: random.Random, half: int | None = None) -> str:
    """A poor answer for this prompt: truncated (a refusal in `half`'s wording), off-topic,
    generic, or repeated text."""
    kind = rng.choice(["truncated", "off_topic", "generic", "repeated"])
    if kind == "truncated":
        words = refusal(prompt, rng, half).split()
        return " ".join(words[:rng.randint(1, max(1, min(4, len(words) - 1)))])
    if kind == "off_topic":
        return rng.choice(OFF_TOPIC)
    if kind == "generic":
        return rng.choice(GENERIC)
    unit = rng.choice(["sorry", "no", "I", "the", "ok", "help"])
    return " ".join([unit] * rng.randint(8, 24))

