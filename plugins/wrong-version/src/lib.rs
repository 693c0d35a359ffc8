//! `wrong-version`: a plugin built against another version of Rebound's WIT package
//! (`rebound:plugin@0.2.0`, whose `handle` takes the parameters as text), which the host
//! must refuse at load time with an error naming the file and what is missing, while it
//! keeps serving its other plugins.

#![allow(missing_docs, unsafe_code)]

wit_bindgen::generate!({
    inline: "
        package rebound:plugin@0.2.0;

        world handler {
            export handle: func(params: string) -> result<string, string>;
        }
    ",
});

struct WrongVersion;

impl Guest for WrongVersion {
    fn handle(params: String) -> Result<String, String> {
        Ok(params)
    }
}

export!(WrongVersion);
