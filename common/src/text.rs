//! Text normalisation shared by identity (fuzzy fields) and profiles (households).

/// A street address for comparison: lower case, accents and punctuation removed, common
/// words abbreviated one way ("Street" and "St." are both "st"), unit words dropped.
pub fn normalise_address(t: &str) -> String {
    fold(t, true)
        .split(' ')
        .map(|w| match w {
            "street" => "st",
            "road" => "rd",
            "avenue" | "av" => "ave",
            "drive" => "dr",
            "lane" => "ln",
            "place" => "pl",
            "court" => "ct",
            "boulevard" => "blvd",
            "square" => "sq",
            "terrace" => "tce",
            "crescent" => "cres",
            "highway" => "hwy",
            "north" => "n",
            "south" => "s",
            "east" => "e",
            "west" => "w",
            other => other,
        })
        // Unit markers go: "Apt 4", "Unit 4" and "#4" are all "4".
        .filter(|w| !matches!(*w, "apartment" | "apt" | "unit" | "flat" | "suite" | "ste"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A postcode: letters and digits only, upper case.
pub fn normalise_postcode(t: &str) -> String {
    t.chars()
        .filter(char::is_ascii_alphanumeric)
        .collect::<String>()
        .to_ascii_uppercase()
}

/// Lower-case letters (accents removed) and, with `digits`, digits; other characters
/// become single spaces.
pub fn fold(s: &str, digits: bool) -> String {
    let mut out = String::with_capacity(s.len());
    let mut space = false;
    for c in s.chars().flat_map(char::to_lowercase) {
        let c = deaccent(c);
        if c.is_alphabetic() || (digits && c.is_ascii_digit()) {
            if space && !out.is_empty() {
                out.push(' ');
            }
            space = false;
            out.push(c);
        } else if c != '\'' {
            space = true;
        }
    }
    out
}

fn deaccent(c: char) -> char {
    match c {
        'à' | 'á' | 'â' | 'ã' | 'ä' | 'å' => 'a',
        'ç' => 'c',
        'è' | 'é' | 'ê' | 'ë' => 'e',
        'ì' | 'í' | 'î' | 'ï' => 'i',
        'ñ' => 'n',
        'ò' | 'ó' | 'ô' | 'õ' | 'ö' | 'ø' => 'o',
        'ù' | 'ú' | 'û' | 'ü' => 'u',
        'ý' | 'ÿ' => 'y',
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_and_postcodes_compare_in_one_form() {
        assert_eq!(
            normalise_address("12 North Main Street, Apt. 4"),
            "12 n main st 4"
        );
        assert_eq!(normalise_address("12 N. Main St #4"), "12 n main st 4");
        assert_eq!(normalise_postcode(" sw1a 1aa"), "SW1A1AA");
        assert_eq!(fold("José O'Brien", false), "jose obrien");
    }
}
