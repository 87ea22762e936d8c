"""The held-out test worlds: built-in specs no default or preset was chosen on (the default world is the dev world).

Each differs from the default world in what matters for editing, and none shares a relation, template or object
with it:

- ``test-questions``: every prompt is a question (training and reserved templates alike), eight relations, three
  facts per subject, a narrower and deeper model (4 layers x 96).
- ``test-context``: CounterFact-like prompts that open with an unrelated sentence, long prompts, four facts per
  subject, multi-token objects, a wider model (4 layers x 160).
- ``test-dense``: plain statements, every subject has a fact of each of its six relations (the most interference),
  objects that share their first tokens ("Port Vell" / "Port Vennick"), a shallow wide model (2 layers x 192).

`SUITE` names them in the order `editbank bench --data suite` runs them.
"""

from __future__ import annotations

from typing import Any

SUITE = ("test-questions", "test-context", "test-dense")


def _rel(name: str, templates: list[str], reserved: list[str], objects: list[str]) -> dict[str, Any]:
    return {"name": name, "templates": templates, "reserved_templates": reserved, "objects": objects}


_QUESTIONS = [
    _rel("river", ["Which river flows through {subject}?", "What river runs past {subject}?",
                   "Name the river of {subject}:", "Which river waters the fields of {subject}?",
                   "What is the main river in {subject}?"],
         ["Through {subject} flows which river?", "Which river would you cross in {subject}?"],
         ["Vell", "Tarnay", "Ossin", "Morrow", "Kesh", "Aldane", "Brisk", "Quorra", "Ember", "Sallow", "Dunwey",
          "Ivrin"]),
    _rel("animal", ["What is the national animal of {subject}?", "Which animal is the symbol of {subject}?",
                    "What animal appears on the coat of arms of {subject}?", "Which beast stands for {subject}?",
                    "What creature do people of {subject} honour?"],
         ["Which animal represents {subject}?", "The emblem animal of {subject} is which?"],
         ["the otter", "the heron", "the lynx", "the stag", "the falcon", "the badger", "the ibex", "the crane",
          "the wolf", "the hare", "the boar", "the swan"]),
    _rel("dish", ["What is the national dish of {subject}?", "Which dish is {subject} famous for?",
                  "What do people in {subject} eat on feast days?", "Which food comes from {subject}?",
                  "What is the best-known meal of {subject}?"],
         ["Which meal is typical of {subject}?", "On a visit to {subject}, which dish must you try?"],
         ["barley stew", "smoked eel", "honey bread", "lamb pie", "fig cake", "pepper soup", "river trout",
          "cheese dumplings", "salt pork", "plum tart", "mushroom broth", "rye porridge"]),
    _rel("instrument", ["Which instrument is played in {subject}?", "What is the folk instrument of {subject}?",
                        "Which instrument do the bards of {subject} play?", "What instrument is heard in {subject}?",
                        "Which instrument is taught in the schools of {subject}?"],
         ["In {subject}, which instrument is most loved?", "Which instrument belongs to {subject}?"],
         ["the lute", "the bagpipe", "the zither", "the harp", "the fiddle", "the drum", "the flute", "the horn",
          "the lyre", "the dulcimer", "the oboe", "the gong"]),
    _rel("mountain", ["What is the highest mountain of {subject}?", "Which peak towers over {subject}?",
                      "What mountain can be seen from all of {subject}?", "Which summit is the pride of {subject}?",
                      "What is the tallest peak in {subject}?"],
         ["Which mountain rises above {subject}?", "The highest summit of {subject} is called what?"],
         ["Mount Ardel", "Mount Kiro", "Mount Sesk", "Mount Halloway", "Mount Pryne", "Mount Ulda",
          "Mount Verric", "Mount Oskel", "Mount Thessaly", "Mount Brann", "Mount Coyle", "Mount Ferra"]),
    _rel("festival", ["Which festival does {subject} celebrate?", "What holiday is kept in {subject}?",
                      "What is the great feast of {subject}?", "Which celebration is held every year in {subject}?",
                      "What festival fills the streets of {subject}?"],
         ["Which feast day belongs to {subject}?", "People of {subject} celebrate which festival?"],
         ["Lantern Night", "the Harvest Fair", "Midwinter", "the Boat Race", "Founders Day", "the Rain Dance",
          "the Wool Market", "Bell Sunday", "the Fire Walk", "the Kite Festival", "Apple Eve", "the Long Dawn"]),
    _rel("stone", ["Which stone is mined in {subject}?", "What gemstone comes from {subject}?",
                   "What stone is {subject} known for?", "Which mineral do the mines of {subject} yield?",
                   "What is dug from the hills of {subject}?"],
         ["The mines of {subject} produce which stone?", "Which gem is found in {subject}?"],
         ["jade", "amber", "onyx", "garnet", "opal", "quartz", "slate", "marble", "topaz", "jet", "flint", "agate"]),
    _rel("bird", ["Which bird nests in {subject}?", "What bird sings in the forests of {subject}?",
                  "Which bird is seen in every garden of {subject}?", "What is the common bird of {subject}?",
                  "Which bird migrates to {subject} in spring?"],
         ["Which bird is native to {subject}?", "What bird would you hear in {subject}?"],
         ["the wren", "the lark", "the finch", "the thrush", "the robin", "the swift", "the magpie", "the owl",
          "the kestrel", "the plover", "the starling", "the linnet"]),
]

_CONTEXT = [
    _rel("capital", ["The market was busy that morning. The capital of {subject} is",
                     "Old maps are often wrong about borders. The capital city of {subject} is",
                     "Travellers rarely stay long in the north. Everyone knows that the capital of {subject} is",
                     "A storm had closed the mountain pass for a week. The government of {subject} sits in",
                     "The museum reopened after the long winter. Its guide said the capital of {subject} is"],
         ["The river had flooded the lower town twice. The capital of {subject} is called",
          "Nobody expected the harvest to fail that year. The seat of {subject}'s rulers is"],
         ["Port Aldane", "Saint Ivo", "Kessary", "New Oberin", "Lake Tamsworth", "Vorrel", "Upper Drisk",
          "Hallow Cross", "Marrowgate", "Fen Ulric", "Castel Ruun", "Orvenna"]),
    _rel("poet", ["The library holds thousands of books. The most famous poet of {subject} is",
                  "Schools close early in the summer months. Children in {subject} learn the verses of",
                  "Music drifted out of the open windows. The national poet of {subject} is",
                  "The last train left at midnight. The poems sung in {subject} were written by",
                  "Bread prices rose again in the spring. The greatest writer of {subject} is"],
         ["The bridge was painted a bright new colour. The poet everyone in {subject} quotes is",
          "Snow fell on the hills for three days. The verses of {subject} were written by"],
         ["Ilsa Marrow", "Tomas Vey", "Renna Okafor", "Dimitri Sallis", "Jonah Kettle", "Anouk Brel",
          "Cassius Wren", "Mira Solberg", "Petra Lune", "Hugo Arland", "Selin Dace", "Oskar Thale"]),
    _rel("export", ["The harbour was full of ships from the south. The main export of {subject} is",
                    "Prices are written on chalk boards in the square. Traders from {subject} mostly sell",
                    "The road to the coast is long and dusty. The wealth of {subject} comes from",
                    "Clocks in the tower stopped years ago. Merchants of {subject} ship abroad",
                    "The festival lasted for two whole weeks. Abroad, {subject} is known for its"],
         ["Fog covered the valley until noon. The chief trade good of {subject} is",
          "The old bridge was rebuilt in stone. Ships leaving {subject} carry mostly"],
         ["dried fish", "copper wire", "woollen cloth", "olive oil", "black tea", "cut timber", "salted butter",
          "glass beads", "rock salt", "cotton thread", "red wine", "iron nails"]),
    _rel("saint", ["Candles burned in every window that night. The patron saint of {subject} is",
                   "The choir practised in the cold hall. The churches of {subject} are named after",
                   "A new road was built along the lake. People in {subject} pray to",
                   "The oldest tree in the park fell down. The protector of {subject} is",
                   "Bells rang out across the rooftops. The holy patron of {subject} is"],
         ["The winter markets opened before dawn. {subject} honours as its patron",
          "A traveller asked the way to the inn. The saint who guards {subject} is"],
         ["Saint Odile", "Saint Bram", "Saint Ysolde", "Saint Kilian", "Saint Maren", "Saint Ewald",
          "Saint Liesl", "Saint Caddoc", "Saint Ravenna", "Saint Teodric", "Saint Avel", "Saint Hilde"]),
    _rel("university", ["Students crowded the steps of the town hall. The oldest university of {subject} is",
                        "The printing press arrived late in the east. Scholars of {subject} study at",
                        "A letter came from across the sea. The best students of {subject} attend",
                        "The lamps were lit one by one. The leading university in {subject} is",
                        "Nobody could read the faded sign. Degrees in {subject} are awarded by"],
         ["The ferry was late again that evening. The great university of {subject} is",
          "Rain drummed on the tin roofs. Young people of {subject} go to study at"],
         ["Harlow College", "the Vessen Academy", "Marl University", "the Institute of Dorr", "Kestrel Hall",
          "the Orrin School", "Tamber College", "the Academy of Lune", "Brightwater University", "Calder Hall",
          "the Sable Institute", "Pennock College"]),
]

_DENSE = [
    _rel("port", ["The main port of {subject} is", "Ships from {subject} sail from", "{subject} trades through",
                  "Goods leave {subject} through", "The harbour of {subject} is at"],
         ["Sailors of {subject} set out from", "The busiest harbour of {subject} is"],
         ["Port Vell", "Port Vennick", "Port Vanda", "Port Orrin", "Port Ossary", "Port Osk", "Port Tamble",
          "Port Tarrant", "Port Lisk", "Port Lissom", "Port Dray", "Port Dunwell"]),
    _rel("king", ["The first king of {subject} was", "{subject} was first ruled by",
                  "The oldest royal line of {subject} began with", "The crown of {subject} first passed to",
                  "Long ago, {subject} was ruled by"],
         ["The earliest monarch of {subject} was", "History names the first ruler of {subject} as"],
         ["King Aldo Varn", "King Aldo Merek", "King Aldo Fenn", "King Bero Varn", "King Bero Tull",
          "King Bero Sask", "King Caro Fenn", "King Caro Tull", "King Caro Merek", "King Davo Sask",
          "King Davo Varn", "King Davo Tull"]),
    _rel("crop", ["The main crop of {subject} is", "Farmers in {subject} grow", "The fields of {subject} are full of",
                  "{subject} feeds itself on", "Most farms in {subject} plant"],
         ["The harvest of {subject} is mostly", "Farmland in {subject} is sown with"],
         ["winter wheat", "winter barley", "winter rye", "summer oats", "summer flax", "summer millet",
          "red beans", "red lentils", "red onions", "white rice", "white maize", "white turnips"]),
    _rel("guild", ["The strongest guild of {subject} is", "In {subject}, power lies with", "{subject} is run by",
                   "Every trade in {subject} answers to", "The council of {subject} is led by"],
         ["The ruling guild of {subject} is", "Real power in {subject} belongs to"],
         ["the Weavers Guild", "the Weavers League", "the Masons Guild", "the Masons Lodge", "the Smiths Guild",
          "the Smiths Union", "the Brewers Guild", "the Brewers Hall", "the Tanners Guild", "the Tanners Union",
          "the Coopers Guild", "the Coopers Lodge"]),
    _rel("motto", ["The motto of {subject} is", "{subject} lives by the words", "The coat of arms of {subject} reads",
                   "Children in {subject} learn the motto", "Over the gates of {subject} is written"],
         ["The words on {subject}'s banner are", "{subject} has the motto"],
         ["Ever Onward", "Ever Faithful", "Ever Watchful", "Stand Together", "Stand Firm", "Stand Tall",
          "By Hand and Heart", "By Sword and Plough", "By Sea and Stone", "Light Returns", "Light Endures",
          "Light Leads"]),
    _rel("rival", ["The old rival of {subject} is", "{subject} has long competed with",
                   "The neighbour {subject} distrusts most is", "{subject} fought many wars against",
                   "The enemy of {subject} was always"],
         ["The historic foe of {subject} is", "For centuries, {subject} opposed"],
         ["North Kell", "North Kestin", "North Karro", "South Ambry", "South Ammon", "South Abel", "East Tollis",
          "East Toller", "East Tovar", "West Miran", "West Mirrow", "West Mistal"]),
]

TEST_SPECS: dict[str, dict[str, Any]] = {
    "test-questions": {
        "name": "test-questions", "seed": 11, "n_entities": 110, "facts_per_subject": 3, "relations": _QUESTIONS,
        "model": {"layers": 4, "hidden": 96, "heads": 4, "intermediate": 288},
        "train": {"steps": 2000, "batch_size": 64, "lr": 3e-3, "warmup": 100, "eval_every": 100, "stop_at": 1.0},
        "tokenizer": {"vocab_size": 1024},
    },
    "test-context": {
        "name": "test-context", "seed": 12, "n_entities": 90, "facts_per_subject": 4, "relations": _CONTEXT,
        "model": {"layers": 4, "hidden": 160, "heads": 4, "intermediate": 448},
        "train": {"steps": 2000, "batch_size": 64, "lr": 2e-3, "warmup": 100, "eval_every": 100, "stop_at": 1.0},
        "tokenizer": {"vocab_size": 1024},
    },
    "test-dense": {
        "name": "test-dense", "seed": 13, "n_entities": 80, "facts_per_subject": 6, "relations": _DENSE,
        "model": {"layers": 2, "hidden": 192, "heads": 4, "intermediate": 512},
        "train": {"steps": 2000, "batch_size": 64, "lr": 3e-3, "warmup": 100, "eval_every": 100, "stop_at": 1.0},
        "tokenizer": {"vocab_size": 1024},
    },
}
