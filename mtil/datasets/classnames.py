"""Readable class names for CLIP zero-shot heads.

Names follow OpenAI's public CLIP lists (``data/prompts.md`` and the "Prompt
Engineering for ImageNet" notebook), arranged in torchvision's label order.

torchvision (0.29) already gives usable ``.classes`` for some datasets:

* FGVCAircraft (``variants.txt``) and StanfordCars (``cars_meta.mat``) give
  exactly CLIP's strings ("707-320", "F/A-18", "AM General Hummer SUV 2000"),
  so they are used as-is.
* Food101 ("apple_pie"), SUN397 ("apartment_building/outdoor") and
  OxfordIIITPet ("American Pit Bull Terrier") need the small converters below.

Note that CLIP's tokenizer lower-cases its input, so letter case in a class
name never changes the text embedding; it is kept only to match CLIP's lists.
"""

from __future__ import annotations

import re

__all__ = [
    "IMAGENET_CLASSNAMES",
    "FLOWERS102_CLASSNAMES",
    "CALTECH101_READABLE",
    "EUROSAT_READABLE",
    "CIFAR10_CLASSNAMES",
    "CIFAR100_CLASSNAMES",
    "DTD_CLASSNAMES",
    "MNIST_CLASSNAMES",
    "readable",
    "food101_readable",
    "sun397_readable",
    "oxfordpet_readable",
]


def readable(name: str) -> str:
    """Turn a folder/class id into readable text.

    Rule: ``_`` and ``/`` become spaces, runs of whitespace collapse to one
    space, and the ends are stripped. Hyphens and letter case are left alone
    (CLIP keeps "polka-dotted", "hard-leaved"); lower-casing, where CLIP's list
    does it, is done by the dataset-specific helpers.
    """
    return " ".join(name.replace("_", " ").replace("/", " ").split())


def food101_readable(name: str) -> str:
    """torchvision Food101 class ("apple_pie") -> CLIP name ("apple pie")."""
    return readable(name)


_SUN397_PREFIX = re.compile(r"^/[a-z]/")


def sun397_readable(name: str) -> str:
    """torchvision SUN397 class -> CLIP name.

    Accepts torchvision's form ("apartment_building/outdoor") or a raw
    ``ClassName.txt`` line ("/a/apartment_building/outdoor"); both give
    "apartment building outdoor", as in CLIP's list.
    """
    return readable(_SUN397_PREFIX.sub("", name.strip()))


def oxfordpet_readable(name: str) -> str:
    """torchvision OxfordIIITPet class ("American Pit Bull Terrier") -> lower-case
    CLIP-style name ("american pit bull terrier").

    CLIP's prompts.md capitalises the 12 cat breeds ("Abyssinian") and not the
    dogs; since the CLIP tokenizer lower-cases anyway, we lower-case all.
    """
    return readable(name).lower()


CIFAR10_CLASSNAMES: list[str] = [
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
]

CIFAR100_CLASSNAMES: list[str] = [
    "apple", "aquarium fish", "baby", "bear", "beaver",
    "bed", "bee", "beetle", "bicycle", "bottle",
    "bowl", "boy", "bridge", "bus", "butterfly",
    "camel", "can", "castle", "caterpillar", "cattle",
    "chair", "chimpanzee", "clock", "cloud", "cockroach",
    "couch", "crab", "crocodile", "cup", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox",
    "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "lawn mower", "leopard", "lion", "lizard",
    "lobster", "man", "maple tree", "motorcycle", "mountain",
    "mouse", "mushroom", "oak tree", "orange", "orchid",
    "otter", "palm tree", "pear", "pickup truck", "pine tree",
    "plain", "plate", "poppy", "porcupine", "possum",
    "rabbit", "raccoon", "ray", "road", "rocket",
    "rose", "sea", "seal", "shark", "shrew",
    "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflower", "sweet pepper", "table",
    "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulip", "turtle", "wardrobe",
    "whale", "willow tree", "wolf", "woman", "worm",
]

DTD_CLASSNAMES: list[str] = [
    "banded", "blotchy", "braided", "bubbly", "bumpy",
    "chequered", "cobwebbed", "cracked", "crosshatched", "crystalline",
    "dotted", "fibrous", "flecked", "freckled", "frilly",
    "gauzy", "grid", "grooved", "honeycombed", "interlaced",
    "knitted", "lacelike", "lined", "marbled", "matted",
    "meshed", "paisley", "perforated", "pitted", "pleated",
    "polka-dotted", "porous", "potholed", "scaly", "smeared",
    "spiralled", "sprinkled", "stained", "stratified", "striped",
    "studded", "swirly", "veined", "waffled", "woven",
    "wrinkled", "zigzagged",
]

MNIST_CLASSNAMES: list[str] = [str(i) for i in range(10)]

# Keys: torchvision EuroSAT folders (ImageFolder order = label order).
EUROSAT_READABLE: dict[str, str] = {
    "AnnualCrop": "annual crop land",
    "Forest": "forest",
    "HerbaceousVegetation": "brushland or shrubland",
    "Highway": "highway or road",
    "Industrial": "industrial buildings or commercial buildings",
    "Pasture": "pasture land",
    "PermanentCrop": "permanent crop land",
    "Residential": "residential buildings or homes or apartments",
    "River": "river",
    "SeaLake": "lake or sea",
}

# CLIP's names, in torchvision Flowers102 label order (label 0 = "pink primrose").
# They differ from torchvision's own ``classes`` in three places:
# "globe flower", "pink and yellow dahlia" and "air plant".
FLOWERS102_CLASSNAMES: list[str] = [
    "pink primrose", "hard-leaved pocket orchid", "canterbury bells", "sweet pea",
    "english marigold", "tiger lily", "moon orchid", "bird of paradise",
    "monkshood", "globe thistle", "snapdragon", "colt's foot",
    "king protea", "spear thistle", "yellow iris", "globe flower",
    "purple coneflower", "peruvian lily", "balloon flower", "giant white arum lily",
    "fire lily", "pincushion flower", "fritillary", "red ginger",
    "grape hyacinth", "corn poppy", "prince of wales feathers", "stemless gentian",
    "artichoke", "sweet william", "carnation", "garden phlox",
    "love in the mist", "mexican aster", "alpine sea holly", "ruby-lipped cattleya",
    "cape flower", "great masterwort", "siam tulip", "lenten rose",
    "barbeton daisy", "daffodil", "sword lily", "poinsettia",
    "bolero deep blue", "wallflower", "marigold", "buttercup",
    "oxeye daisy", "common dandelion", "petunia", "wild pansy",
    "primula", "sunflower", "pelargonium", "bishop of llandaff",
    "gaura", "geranium", "orange dahlia", "pink and yellow dahlia",
    "cautleya spicata", "japanese anemone", "black-eyed susan", "silverbush",
    "californian poppy", "osteospermum", "spring crocus", "bearded iris",
    "windflower", "tree poppy", "gazania", "azalea",
    "water lily", "rose", "thorn apple", "morning glory",
    "passion flower", "lotus", "toad lily", "anthurium",
    "frangipani", "clematis", "hibiscus", "columbine",
    "desert-rose", "tree mallow", "magnolia", "cyclamen",
    "watercress", "canna lily", "hippeastrum", "bee balm",
    "air plant", "foxglove", "bougainvillea", "camellia",
    "mallow", "mexican petunia", "bromelia", "blanket flower",
    "trumpet creeper", "blackberry lily",
]

# Keys: torchvision Caltech101 ``categories`` (sorted folders of
# 101_ObjectCategories without BACKGROUND_Google), so value order = label order.
CALTECH101_READABLE: dict[str, str] = {
    "Faces": "off-center face",
    "Faces_easy": "centered face",
    "Leopards": "leopard",
    "Motorbikes": "motorbike",
    "accordion": "accordion",
    "airplanes": "airplane",
    "anchor": "anchor",
    "ant": "ant",
    "barrel": "barrel",
    "bass": "bass",
    "beaver": "beaver",
    "binocular": "binocular",
    "bonsai": "bonsai",
    "brain": "brain",
    "brontosaurus": "brontosaurus",
    "buddha": "buddha",
    "butterfly": "butterfly",
    "camera": "camera",
    "cannon": "cannon",
    "car_side": "side of a car",
    "ceiling_fan": "ceiling fan",
    "cellphone": "cellphone",
    "chair": "chair",
    "chandelier": "chandelier",
    "cougar_body": "body of a cougar cat",
    "cougar_face": "face of a cougar cat",
    "crab": "crab",
    "crayfish": "crayfish",
    "crocodile": "crocodile",
    "crocodile_head": "head of a crocodile",  # prompts.md has a double space here
    "cup": "cup",
    "dalmatian": "dalmatian",
    "dollar_bill": "dollar bill",
    "dolphin": "dolphin",
    "dragonfly": "dragonfly",
    "electric_guitar": "electric guitar",
    "elephant": "elephant",
    "emu": "emu",
    "euphonium": "euphonium",
    "ewer": "ewer",
    "ferry": "ferry",
    "flamingo": "flamingo",
    "flamingo_head": "head of a flamingo",
    "garfield": "garfield",
    "gerenuk": "gerenuk",
    "gramophone": "gramophone",
    "grand_piano": "grand piano",
    "hawksbill": "hawksbill",
    "headphone": "headphone",
    "hedgehog": "hedgehog",
    "helicopter": "helicopter",
    "ibis": "ibis",
    "inline_skate": "inline skate",
    "joshua_tree": "joshua tree",
    "kangaroo": "kangaroo",
    "ketch": "ketch",
    "lamp": "lamp",
    "laptop": "laptop",
    "llama": "llama",
    "lobster": "lobster",
    "lotus": "lotus",
    "mandolin": "mandolin",
    "mayfly": "mayfly",
    "menorah": "menorah",
    "metronome": "metronome",
    "minaret": "minaret",
    "nautilus": "nautilus",
    "octopus": "octopus",
    "okapi": "okapi",
    "pagoda": "pagoda",
    "panda": "panda",
    "pigeon": "pigeon",
    "pizza": "pizza",
    "platypus": "platypus",
    "pyramid": "pyramid",
    "revolver": "revolver",
    "rhino": "rhino",
    "rooster": "rooster",
    "saxophone": "saxophone",
    "schooner": "schooner",
    "scissors": "scissors",
    "scorpion": "scorpion",
    "sea_horse": "sea horse",
    "snoopy": "snoopy (cartoon beagle)",
    "soccer_ball": "soccer ball",
    "stapler": "stapler",
    "starfish": "starfish",
    "stegosaurus": "stegosaurus",
    "stop_sign": "stop sign",
    "strawberry": "strawberry",
    "sunflower": "sunflower",
    "tick": "tick",
    "trilobite": "trilobite",
    "umbrella": "umbrella",
    "watch": "watch",
    "water_lilly": "water lilly",
    "wheelchair": "wheelchair",
    "wild_cat": "wild cat",
    "windsor_chair": "windsor chair",
    "wrench": "wrench",
    "yin_yang": "yin and yang symbol",
}

# OpenAI's 1000 ImageNet names in standard class-index order, ten per line.
# As published, two names occur twice: "missile" (657, 744) and "sunglasses"
# (836, 837); they are kept so that zero-shot results match CLIP's.
IMAGENET_CLASSNAMES: list[str] = [
    "tench", "goldfish", "great white shark", "tiger shark", "hammerhead shark", "electric ray", "stingray", "rooster", "hen", "ostrich",  # noqa: E501
    "brambling", "goldfinch", "house finch", "junco", "indigo bunting", "American robin", "bulbul", "jay", "magpie", "chickadee",  # noqa: E501
    "American dipper", "kite (bird of prey)", "bald eagle", "vulture", "great grey owl", "fire salamander", "smooth newt", "newt", "spotted salamander", "axolotl",  # noqa: E501
    "American bullfrog", "tree frog", "tailed frog", "loggerhead sea turtle", "leatherback sea turtle", "mud turtle", "terrapin", "box turtle", "banded gecko", "green iguana",  # noqa: E501
    "Carolina anole", "desert grassland whiptail lizard", "agama", "frilled-necked lizard", "alligator lizard", "Gila monster", "European green lizard", "chameleon", "Komodo dragon", "Nile crocodile",  # noqa: E501
    "American alligator", "triceratops", "worm snake", "ring-necked snake", "eastern hog-nosed snake", "smooth green snake", "kingsnake", "garter snake", "water snake", "vine snake",  # noqa: E501
    "night snake", "boa constrictor", "African rock python", "Indian cobra", "green mamba", "sea snake", "Saharan horned viper", "eastern diamondback rattlesnake", "sidewinder rattlesnake", "trilobite",  # noqa: E501
    "harvestman", "scorpion", "yellow garden spider", "barn spider", "European garden spider", "southern black widow", "tarantula", "wolf spider", "tick", "centipede",  # noqa: E501
    "black grouse", "ptarmigan", "ruffed grouse", "prairie grouse", "peafowl", "quail", "partridge", "african grey parrot", "macaw", "sulphur-crested cockatoo",  # noqa: E501
    "lorikeet", "coucal", "bee eater", "hornbill", "hummingbird", "jacamar", "toucan", "duck", "red-breasted merganser", "goose",  # noqa: E501
    "black swan", "tusker", "echidna", "platypus", "wallaby", "koala", "wombat", "jellyfish", "sea anemone", "brain coral",  # noqa: E501
    "flatworm", "nematode", "conch", "snail", "slug", "sea slug", "chiton", "chambered nautilus", "Dungeness crab", "rock crab",  # noqa: E501
    "fiddler crab", "red king crab", "American lobster", "spiny lobster", "crayfish", "hermit crab", "isopod", "white stork", "black stork", "spoonbill",  # noqa: E501
    "flamingo", "little blue heron", "great egret", "bittern bird", "crane bird", "limpkin", "common gallinule", "American coot", "bustard", "ruddy turnstone",  # noqa: E501
    "dunlin", "common redshank", "dowitcher", "oystercatcher", "pelican", "king penguin", "albatross", "grey whale", "killer whale", "dugong",  # noqa: E501
    "sea lion", "Chihuahua", "Japanese Chin", "Maltese", "Pekingese", "Shih Tzu", "King Charles Spaniel", "Papillon", "toy terrier", "Rhodesian Ridgeback",  # noqa: E501
    "Afghan Hound", "Basset Hound", "Beagle", "Bloodhound", "Bluetick Coonhound", "Black and Tan Coonhound", "Treeing Walker Coonhound", "English foxhound", "Redbone Coonhound", "borzoi",  # noqa: E501
    "Irish Wolfhound", "Italian Greyhound", "Whippet", "Ibizan Hound", "Norwegian Elkhound", "Otterhound", "Saluki", "Scottish Deerhound", "Weimaraner", "Staffordshire Bull Terrier",  # noqa: E501
    "American Staffordshire Terrier", "Bedlington Terrier", "Border Terrier", "Kerry Blue Terrier", "Irish Terrier", "Norfolk Terrier", "Norwich Terrier", "Yorkshire Terrier", "Wire Fox Terrier", "Lakeland Terrier",  # noqa: E501
    "Sealyham Terrier", "Airedale Terrier", "Cairn Terrier", "Australian Terrier", "Dandie Dinmont Terrier", "Boston Terrier", "Miniature Schnauzer", "Giant Schnauzer", "Standard Schnauzer", "Scottish Terrier",  # noqa: E501
    "Tibetan Terrier", "Australian Silky Terrier", "Soft-coated Wheaten Terrier", "West Highland White Terrier", "Lhasa Apso", "Flat-Coated Retriever", "Curly-coated Retriever", "Golden Retriever", "Labrador Retriever", "Chesapeake Bay Retriever",  # noqa: E501
    "German Shorthaired Pointer", "Vizsla", "English Setter", "Irish Setter", "Gordon Setter", "Brittany dog", "Clumber Spaniel", "English Springer Spaniel", "Welsh Springer Spaniel", "Cocker Spaniel",  # noqa: E501
    "Sussex Spaniel", "Irish Water Spaniel", "Kuvasz", "Schipperke", "Groenendael dog", "Malinois", "Briard", "Australian Kelpie", "Komondor", "Old English Sheepdog",  # noqa: E501
    "Shetland Sheepdog", "collie", "Border Collie", "Bouvier des Flandres dog", "Rottweiler", "German Shepherd Dog", "Dobermann", "Miniature Pinscher", "Greater Swiss Mountain Dog", "Bernese Mountain Dog",  # noqa: E501
    "Appenzeller Sennenhund", "Entlebucher Sennenhund", "Boxer", "Bullmastiff", "Tibetan Mastiff", "French Bulldog", "Great Dane", "St. Bernard", "husky", "Alaskan Malamute",  # noqa: E501
    "Siberian Husky", "Dalmatian", "Affenpinscher", "Basenji", "pug", "Leonberger", "Newfoundland dog", "Great Pyrenees dog", "Samoyed", "Pomeranian",  # noqa: E501
    "Chow Chow", "Keeshond", "brussels griffon", "Pembroke Welsh Corgi", "Cardigan Welsh Corgi", "Toy Poodle", "Miniature Poodle", "Standard Poodle", "Mexican hairless dog (xoloitzcuintli)", "grey wolf",  # noqa: E501
    "Alaskan tundra wolf", "red wolf or maned wolf", "coyote", "dingo", "dhole", "African wild dog", "hyena", "red fox", "kit fox", "Arctic fox",  # noqa: E501
    "grey fox", "tabby cat", "tiger cat", "Persian cat", "Siamese cat", "Egyptian Mau", "cougar", "lynx", "leopard", "snow leopard",  # noqa: E501
    "jaguar", "lion", "tiger", "cheetah", "brown bear", "American black bear", "polar bear", "sloth bear", "mongoose", "meerkat",  # noqa: E501
    "tiger beetle", "ladybug", "ground beetle", "longhorn beetle", "leaf beetle", "dung beetle", "rhinoceros beetle", "weevil", "fly", "bee",  # noqa: E501
    "ant", "grasshopper", "cricket insect", "stick insect", "cockroach", "praying mantis", "cicada", "leafhopper", "lacewing", "dragonfly",  # noqa: E501
    "damselfly", "red admiral butterfly", "ringlet butterfly", "monarch butterfly", "small white butterfly", "sulphur butterfly", "gossamer-winged butterfly", "starfish", "sea urchin", "sea cucumber",  # noqa: E501
    "cottontail rabbit", "hare", "Angora rabbit", "hamster", "porcupine", "fox squirrel", "marmot", "beaver", "guinea pig", "common sorrel horse",  # noqa: E501
    "zebra", "pig", "wild boar", "warthog", "hippopotamus", "ox", "water buffalo", "bison", "ram (adult male sheep)", "bighorn sheep",  # noqa: E501
    "Alpine ibex", "hartebeest", "impala (antelope)", "gazelle", "arabian camel", "llama", "weasel", "mink", "European polecat", "black-footed ferret",  # noqa: E501
    "otter", "skunk", "badger", "armadillo", "three-toed sloth", "orangutan", "gorilla", "chimpanzee", "gibbon", "siamang",  # noqa: E501
    "guenon", "patas monkey", "baboon", "macaque", "langur", "black-and-white colobus", "proboscis monkey", "marmoset", "white-headed capuchin", "howler monkey",  # noqa: E501
    "titi monkey", "Geoffroy's spider monkey", "common squirrel monkey", "ring-tailed lemur", "indri", "Asian elephant", "African bush elephant", "red panda", "giant panda", "snoek fish",  # noqa: E501
    "eel", "silver salmon", "rock beauty fish", "clownfish", "sturgeon", "gar fish", "lionfish", "pufferfish", "abacus", "abaya",  # noqa: E501
    "academic gown", "accordion", "acoustic guitar", "aircraft carrier", "airliner", "airship", "altar", "ambulance", "amphibious vehicle", "analog clock",  # noqa: E501
    "apiary", "apron", "trash can", "assault rifle", "backpack", "bakery", "balance beam", "balloon", "ballpoint pen", "Band-Aid",  # noqa: E501
    "banjo", "baluster / handrail", "barbell", "barber chair", "barbershop", "barn", "barometer", "barrel", "wheelbarrow", "baseball",  # noqa: E501
    "basketball", "bassinet", "bassoon", "swimming cap", "bath towel", "bathtub", "station wagon", "lighthouse", "beaker", "military hat (bearskin or shako)",  # noqa: E501
    "beer bottle", "beer glass", "bell tower", "baby bib", "tandem bicycle", "bikini", "ring binder", "binoculars", "birdhouse", "boathouse",  # noqa: E501
    "bobsleigh", "bolo tie", "poke bonnet", "bookcase", "bookstore", "bottle cap", "hunting bow", "bow tie", "brass memorial plaque", "bra",  # noqa: E501
    "breakwater", "breastplate", "broom", "bucket", "buckle", "bulletproof vest", "high-speed train", "butcher shop", "taxicab", "cauldron",  # noqa: E501
    "candle", "cannon", "canoe", "can opener", "cardigan", "car mirror", "carousel", "tool kit", "cardboard box / carton", "car wheel",  # noqa: E501
    "automated teller machine", "cassette", "cassette player", "castle", "catamaran", "CD player", "cello", "mobile phone", "chain", "chain-link fence",  # noqa: E501
    "chain mail", "chainsaw", "storage chest", "chiffonier", "bell or wind chime", "china cabinet", "Christmas stocking", "church", "movie theater", "cleaver",  # noqa: E501
    "cliff dwelling", "cloak", "clogs", "cocktail shaker", "coffee mug", "coffeemaker", "spiral or coil", "combination lock", "computer keyboard", "candy store",  # noqa: E501
    "container ship", "convertible", "corkscrew", "cornet", "cowboy boot", "cowboy hat", "cradle", "construction crane", "crash helmet", "crate",  # noqa: E501
    "infant bed", "Crock Pot", "croquet ball", "crutch", "cuirass", "dam", "desk", "desktop computer", "rotary dial telephone", "diaper",  # noqa: E501
    "digital clock", "digital watch", "dining table", "dishcloth", "dishwasher", "disc brake", "dock", "dog sled", "dome", "doormat",  # noqa: E501
    "drilling rig", "drum", "drumstick", "dumbbell", "Dutch oven", "electric fan", "electric guitar", "electric locomotive", "entertainment center", "envelope",  # noqa: E501
    "espresso machine", "face powder", "feather boa", "filing cabinet", "fireboat", "fire truck", "fire screen", "flagpole", "flute", "folding chair",  # noqa: E501
    "football helmet", "forklift", "fountain", "fountain pen", "four-poster bed", "freight car", "French horn", "frying pan", "fur coat", "garbage truck",  # noqa: E501
    "gas mask or respirator", "gas pump", "goblet", "go-kart", "golf ball", "golf cart", "gondola", "gong", "gown", "grand piano",  # noqa: E501
    "greenhouse", "radiator grille", "grocery store", "guillotine", "hair clip", "hair spray", "half-track", "hammer", "hamper", "hair dryer",  # noqa: E501
    "hand-held computer", "handkerchief", "hard disk drive", "harmonica", "harp", "combine harvester", "hatchet", "holster", "home theater", "honeycomb",  # noqa: E501
    "hook", "hoop skirt", "gymnastic horizontal bar", "horse-drawn vehicle", "hourglass", "iPod", "clothes iron", "carved pumpkin", "jeans", "jeep",  # noqa: E501
    "T-shirt", "jigsaw puzzle", "rickshaw", "joystick", "kimono", "knee pad", "knot", "lab coat", "ladle", "lampshade",  # noqa: E501
    "laptop computer", "lawn mower", "lens cap", "letter opener", "library", "lifeboat", "lighter", "limousine", "ocean liner", "lipstick",  # noqa: E501
    "slip-on shoe", "lotion", "music speaker", "loupe magnifying glass", "sawmill", "magnetic compass", "messenger bag", "mailbox", "tights", "one-piece bathing suit",  # noqa: E501
    "manhole cover", "maraca", "marimba", "mask", "matchstick", "maypole", "maze", "measuring cup", "medicine cabinet", "megalith",  # noqa: E501
    "microphone", "microwave oven", "military uniform", "milk can", "minibus", "miniskirt", "minivan", "missile", "mitten", "mixing bowl",  # noqa: E501
    "mobile home", "ford model t", "modem", "monastery", "monitor", "moped", "mortar and pestle", "graduation cap", "mosque", "mosquito net",  # noqa: E501
    "vespa", "mountain bike", "tent", "computer mouse", "mousetrap", "moving van", "muzzle", "metal nail", "neck brace", "necklace",  # noqa: E501
    "baby pacifier", "notebook computer", "obelisk", "oboe", "ocarina", "odometer", "oil filter", "pipe organ", "oscilloscope", "overskirt",  # noqa: E501
    "bullock cart", "oxygen mask", "product packet / packaging", "paddle", "paddle wheel", "padlock", "paintbrush", "pajamas", "palace", "pan flute",  # noqa: E501
    "paper towel", "parachute", "parallel bars", "park bench", "parking meter", "railroad car", "patio", "payphone", "pedestal", "pencil case",  # noqa: E501
    "pencil sharpener", "perfume", "Petri dish", "photocopier", "plectrum", "Pickelhaube", "picket fence", "pickup truck", "pier", "piggy bank",  # noqa: E501
    "pill bottle", "pillow", "ping-pong ball", "pinwheel", "pirate ship", "drink pitcher", "block plane", "planetarium", "plastic bag", "plate rack",  # noqa: E501
    "farm plow", "plunger", "Polaroid camera", "pole", "police van", "poncho", "pool table", "soda bottle", "plant pot", "potter's wheel",  # noqa: E501
    "power drill", "prayer rug", "printer", "prison", "missile", "projector", "hockey puck", "punching bag", "purse", "quill",  # noqa: E501
    "quilt", "race car", "racket", "radiator", "radio", "radio telescope", "rain barrel", "recreational vehicle", "fishing casting reel", "reflex camera",  # noqa: E501
    "refrigerator", "remote control", "restaurant", "revolver", "rifle", "rocking chair", "rotisserie", "eraser", "rugby ball", "ruler measuring stick",  # noqa: E501
    "sneaker", "safe", "safety pin", "salt shaker", "sandal", "sarong", "saxophone", "scabbard", "weighing scale", "school bus",  # noqa: E501
    "schooner", "scoreboard", "CRT monitor", "screw", "screwdriver", "seat belt", "sewing machine", "shield", "shoe store", "shoji screen / room divider",  # noqa: E501
    "shopping basket", "shopping cart", "shovel", "shower cap", "shower curtain", "ski", "balaclava ski mask", "sleeping bag", "slide rule", "sliding door",  # noqa: E501
    "slot machine", "snorkel", "snowmobile", "snowplow", "soap dispenser", "soccer ball", "sock", "solar thermal collector", "sombrero", "soup bowl",  # noqa: E501
    "keyboard space bar", "space heater", "space shuttle", "spatula", "motorboat", "spider web", "spindle", "sports car", "spotlight", "stage",  # noqa: E501
    "steam locomotive", "through arch bridge", "steel drum", "stethoscope", "scarf", "stone wall", "stopwatch", "stove", "strainer", "tram",  # noqa: E501
    "stretcher", "couch", "stupa", "submarine", "suit", "sundial", "sunglasses", "sunglasses", "sunscreen", "suspension bridge",  # noqa: E501
    "mop", "sweatshirt", "swim trunks / shorts", "swing", "electrical switch", "syringe", "table lamp", "tank", "tape player", "teapot",  # noqa: E501
    "teddy bear", "television", "tennis ball", "thatched roof", "front curtain", "thimble", "threshing machine", "throne", "tile roof", "toaster",  # noqa: E501
    "tobacco shop", "toilet seat", "torch", "totem pole", "tow truck", "toy store", "tractor", "semi-trailer truck", "tray", "trench coat",  # noqa: E501
    "tricycle", "trimaran", "tripod", "triumphal arch", "trolleybus", "trombone", "hot tub", "turnstile", "typewriter keyboard", "umbrella",  # noqa: E501
    "unicycle", "upright piano", "vacuum cleaner", "vase", "vaulted or arched ceiling", "velvet fabric", "vending machine", "vestment", "viaduct", "violin",  # noqa: E501
    "volleyball", "waffle iron", "wall clock", "wallet", "wardrobe", "military aircraft", "sink", "washing machine", "water bottle", "water jug",  # noqa: E501
    "water tower", "whiskey jug", "whistle", "hair wig", "window screen", "window shade", "Windsor tie", "wine bottle", "airplane wing", "wok",  # noqa: E501
    "wooden spoon", "wool", "split-rail fence", "shipwreck", "sailboat", "yurt", "website", "comic book", "crossword", "traffic or street sign",  # noqa: E501
    "traffic light", "dust jacket", "menu", "plate", "guacamole", "consomme", "hot pot", "trifle", "ice cream", "popsicle",  # noqa: E501
    "baguette", "bagel", "pretzel", "cheeseburger", "hot dog", "mashed potatoes", "cabbage", "broccoli", "cauliflower", "zucchini",  # noqa: E501
    "spaghetti squash", "acorn squash", "butternut squash", "cucumber", "artichoke", "bell pepper", "cardoon", "mushroom", "Granny Smith apple", "strawberry",  # noqa: E501
    "orange", "lemon", "fig", "pineapple", "banana", "jackfruit", "cherimoya (custard apple)", "pomegranate", "hay", "carbonara",  # noqa: E501
    "chocolate syrup", "dough", "meatloaf", "pizza", "pot pie", "burrito", "red wine", "espresso", "tea cup", "eggnog",  # noqa: E501
    "mountain", "bubble", "cliff", "coral reef", "geyser", "lakeshore", "promontory", "sandbar", "beach", "valley",  # noqa: E501
    "volcano", "baseball player", "bridegroom", "scuba diver", "rapeseed", "daisy", "yellow lady's slipper", "corn", "acorn", "rose hip",  # noqa: E501
    "horse chestnut seed", "coral fungus", "agaric", "gyromitra", "stinkhorn mushroom", "earth star fungus", "hen of the woods mushroom", "bolete", "corn cob", "toilet paper",  # noqa: E501
]
