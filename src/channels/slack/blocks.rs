//! Block Kit for the model's attachments, cards and actions: which blocks each becomes, the
//! per-element limits (and the warnings when something is cut to fit), and the `action_id`
//! scheme that lets an inbound click be mapped back to the button the bot sent.
//!
//! Pure: builds JSON values. Packing blocks into messages is `render`'s job.

use serde_json::{Value, json};

use super::mrkdwn;
use crate::channels::RenderError;
use crate::model::{
    ActionType, Attachment, AttachmentContent, CONTENT_TYPE_ADAPTIVE, CardAction, CardImage,
    HeroCard, MediaCard, ReceiptCard, Warning,
};

/// Section text.
pub const SECTION_TEXT_MAX: usize = 3000;
/// One section field.
pub const FIELD_TEXT_MAX: usize = 2000;
/// Fields in one section.
pub const FIELDS_MAX: usize = 10;
/// Elements in one actions block.
pub const ACTIONS_MAX: usize = 25;
/// Button label (plain text).
pub const BUTTON_TEXT_MAX: usize = 75;
/// Button value, given back to the app on a click.
pub const BUTTON_VALUE_MAX: usize = 2000;
/// Button URL, image URL.
pub const URL_MAX: usize = 3000;
/// Image alt text and title.
pub const IMAGE_TEXT_MAX: usize = 2000;
/// `action_id`.
pub const ACTION_ID_MAX: usize = 255;
/// Elements in one context block.
const CONTEXT_MAX: usize = 10;

/// Image types an image block shows (Slack renders png, jpg and gif).
const IMAGE_TYPES: &[&str] = &["image/png", "image/jpeg", "image/jpg", "image/gif"];

/// Blocks that belong together (one card, one image, the text): kept in one message when they fit.
#[derive(Debug, Clone, Default)]
pub struct Group {
    pub blocks: Vec<Value>,
    /// A divider goes before it when something precedes it in the same message (carousel).
    pub divider_before: bool,
}

/// What translating one message collects besides blocks.
pub struct Ctx<'a> {
    pub warnings: &'a mut Vec<Warning>,
    /// Buttons made so far in this message: the ordinal in each `action_id`.
    pub buttons: usize,
}

impl Ctx<'_> {
    fn warn(&mut self, code: &str, field: impl Into<String>, message: impl Into<String>) {
        self.warnings.push(Warning::new(code, field, message));
    }

    /// mrkdwn cut to `max` characters, with a warning naming `field` when it was cut.
    pub fn fit(&mut self, text: String, max: usize, field: &str) -> String {
        match mrkdwn::truncate(&text, max) {
            Some(short) => {
                self.warn(
                    "text_truncated",
                    field,
                    format!(
                        "{} characters; Slack takes at most {max} here: cut to fit",
                        text.chars().count()
                    ),
                );
                short
            }
            None => text,
        }
    }

    fn fit_plain(&mut self, text: &str, max: usize, field: &str, code: &str) -> String {
        match mrkdwn::truncate_plain(text, max) {
            Some(short) => {
                self.warn(
                    code,
                    field,
                    format!(
                        "{} characters; Slack takes at most {max} here: cut to fit",
                        text.chars().count()
                    ),
                );
                short
            }
            None => text.to_string(),
        }
    }
}

/// `1 more message`, `2 more messages`.
pub fn more(n: usize, one: &str, many: &str) -> String {
    format!("{n} more {}", if n == 1 { one } else { many })
}

pub fn mrkdwn_text(text: &str) -> Value {
    json!({"type": "mrkdwn", "text": text})
}

pub fn plain_text(text: &str) -> Value {
    json!({"type": "plain_text", "text": text, "emoji": true})
}

pub fn section(text: Value) -> Value {
    json!({"type": "section", "text": text})
}

pub fn divider() -> Value {
    json!({"type": "divider"})
}

/// The sections for a long mrkdwn (or plain) text: one per 3000 characters, cut at safe points.
pub fn text_sections(text: &str, plain: bool) -> Vec<Value> {
    mrkdwn::split(text, SECTION_TEXT_MAX)
        .into_iter()
        .filter(|t| !t.trim().is_empty())
        .map(|t| {
            section(if plain {
                plain_text(&t)
            } else {
                mrkdwn_text(&t)
            })
        })
        .collect()
}

fn check_url(url: &str, field: &str) -> Result<(), RenderError> {
    let n = url.chars().count();
    if n > URL_MAX {
        return Err(RenderError::invalid(
            field,
            format!("URL is {n} characters; Slack takes at most {URL_MAX}"),
        ));
    }
    Ok(())
}

fn image_element(url: &str, alt: &str) -> Value {
    json!({"type": "image", "image_url": url, "alt_text": alt})
}

/// An image block; `alt` falls back to the title, then to "image" (Slack requires one).
fn image_block(
    ctx: &mut Ctx,
    url: &str,
    alt: Option<&str>,
    title: Option<&str>,
    field: &str,
) -> Result<Value, RenderError> {
    check_url(url, &format!("{field}.url"))?;
    let alt = alt
        .or(title)
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .unwrap_or("image");
    let alt = ctx.fit_plain(
        alt,
        IMAGE_TEXT_MAX,
        &format!("{field}.alt"),
        "text_truncated",
    );
    // A file shared on Slack (an event's `url_private`) is not public: Slack shows it by
    // `slack_file`, where `image_url` would make it fail to download the image.
    let source = if url.starts_with("https://files.slack.com/") {
        ("slack_file", json!({ "url": url }))
    } else {
        ("image_url", json!(url))
    };
    let mut block = json!({"type": "image", source.0: source.1, "alt_text": alt});
    if let Some(t) = title.map(str::trim).filter(|s| !s.is_empty()) {
        let t = ctx.fit_plain(
            t,
            IMAGE_TEXT_MAX,
            &format!("{field}.title"),
            "text_truncated",
        );
        block["title"] = plain_text(&t);
    }
    Ok(block)
}

// ---------------------------------------------------------------------------------------------
// Attachments

/// The blocks for attachment `i`. `field` is `message.attachments[i]`.
pub fn attachment(ctx: &mut Ctx, a: &Attachment, field: &str) -> Result<Group, RenderError> {
    let blocks = match &a.content {
        Some(AttachmentContent::Hero(card)) => hero(ctx, card, &format!("{field}.hero"), field)?,
        Some(AttachmentContent::Thumbnail(card)) => {
            thumbnail(ctx, card, &format!("{field}.thumbnail"), field)?
        }
        Some(AttachmentContent::Receipt(card)) => {
            receipt(ctx, card, &format!("{field}.receipt"), field)?
        }
        Some(AttachmentContent::Signin(card)) => {
            let f = format!("{field}.signin");
            let text = card.text.as_deref().unwrap_or_default();
            let text = if text.trim().is_empty() {
                "Sign in"
            } else {
                text
            };
            text_and_buttons(ctx, text, &card.buttons, &f, field)?
        }
        Some(AttachmentContent::Oauth(card)) => {
            let f = format!("{field}.oauth");
            if !card.buttons.iter().any(|b| b.kind.takes_url()) {
                ctx.warn(
                    "oauth_without_url",
                    format!("{f}.buttons"),
                    "Slack has no Bot Framework token service: an OAuth card shows only its text and buttons; give it a signin button with the sign-in URL",
                );
            }
            let text = card.text.as_deref().unwrap_or_default();
            let text = if text.trim().is_empty() {
                "Sign in"
            } else {
                text
            };
            text_and_buttons(ctx, text, &card.buttons, &f, field)?
        }
        Some(AttachmentContent::Animation(card)) => media(
            ctx,
            card,
            MediaKind::Animation,
            &format!("{field}.animation"),
            field,
        )?,
        Some(AttachmentContent::Audio(card)) => media(
            ctx,
            card,
            MediaKind::Audio,
            &format!("{field}.audio"),
            field,
        )?,
        Some(AttachmentContent::Video(card)) => media(
            ctx,
            card,
            MediaKind::Video,
            &format!("{field}.video"),
            field,
        )?,
        Some(AttachmentContent::Json(v)) => json_content(ctx, a, v, field)?,
        None => file(ctx, a, field)?,
    };
    Ok(Group {
        blocks,
        divider_before: false,
    })
}

fn is_image(content_type: &str) -> bool {
    let t = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    IMAGE_TYPES.contains(&t.as_str())
}

/// A file by URL: an image block for png / jpeg / gif, a link otherwise (uploading is out of
/// scope: Slack would need files.getUploadURLExternal and the bytes).
fn file(ctx: &mut Ctx, a: &Attachment, field: &str) -> Result<Vec<Value>, RenderError> {
    let Some(url) = a.content_url.as_deref().filter(|u| !u.is_empty()) else {
        return Err(RenderError::invalid(field, "needs content_url or a card"));
    };
    if is_image(&a.content_type) {
        let name = a.name.as_deref();
        let block = image_block(ctx, url, name, name, field)?;
        // The image is the content: a title repeating the alt text is enough.
        return Ok(vec![block]);
    }
    Ok(vec![link_section(url, a.name.as_deref(), field)?])
}

fn link_section(url: &str, name: Option<&str>, field: &str) -> Result<Value, RenderError> {
    check_url(url, &format!("{field}.content_url"))?;
    let label = name
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(String::from)
        .unwrap_or_else(|| file_name(url));
    Ok(section(mrkdwn_text(&mrkdwn::link(url, &label))))
}

/// The last path segment of a URL, or the URL itself.
fn file_name(url: &str) -> String {
    url::Url::parse(url)
        .ok()
        .and_then(|u| {
            u.path_segments()
                .and_then(|mut s| s.next_back().map(String::from))
        })
        .filter(|s| !s.is_empty())
        .unwrap_or_else(|| url.to_string())
}

/// Adaptive cards and other JSON content: Slack cannot show them, so their text is shown.
fn json_content(
    ctx: &mut Ctx,
    a: &Attachment,
    v: &Value,
    field: &str,
) -> Result<Vec<Value>, RenderError> {
    let adaptive = a.content_type == CONTENT_TYPE_ADAPTIVE
        || v.get("type").and_then(Value::as_str) == Some("AdaptiveCard");
    if !adaptive {
        if let Some(url) = a.content_url.as_deref().filter(|u| !u.is_empty()) {
            return Ok(vec![link_section(url, a.name.as_deref(), field)?]);
        }
        ctx.warn(
            "attachment_not_supported",
            format!("{field}.json"),
            format!(
                "content type `{}` has no Slack form and no content_url: left out",
                a.content_type
            ),
        );
        return Ok(Vec::new());
    }
    let text = adaptive_text(v);
    ctx.warn(
        "adaptive_card_as_text",
        format!("{field}.json"),
        if text.is_empty() {
            "Slack cannot show adaptive cards and this one has no text: left out".to_string()
        } else {
            "Slack cannot show adaptive cards: sent its fallbackText, or the text of its elements"
                .to_string()
        },
    );
    if text.is_empty() {
        return Ok(Vec::new());
    }
    let text = ctx.fit(
        mrkdwn::from_markdown(&text),
        SECTION_TEXT_MAX,
        &format!("{field}.json"),
    );
    Ok(vec![section(mrkdwn_text(&text))])
}

/// An adaptive card's `fallbackText`, or the text of its elements (TextBlock and TextRun
/// `text`, FactSet facts) one per line.
fn adaptive_text(v: &Value) -> String {
    if let Some(t) = v.get("fallbackText").and_then(Value::as_str)
        && !t.trim().is_empty()
    {
        return t.trim().to_string();
    }
    fn walk(v: &Value, out: &mut Vec<String>) {
        match v {
            Value::Object(o) => {
                if let (Some(title), Some(value)) = (
                    o.get("title").and_then(Value::as_str),
                    o.get("value").and_then(Value::as_str),
                ) && o.get("type").is_none()
                {
                    out.push(format!("**{title}** {value}"));
                    return;
                }
                if let Some(t) = o.get("text").and_then(Value::as_str)
                    && !t.trim().is_empty()
                {
                    out.push(t.trim().to_string());
                }
                for (k, child) in o {
                    if k != "text" && k != "fallbackText" {
                        walk(child, out);
                    }
                }
            }
            Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    let mut lines = Vec::new();
    if let Some(body) = v.get("body") {
        walk(body, &mut lines);
    }
    lines.join("\n")
}

// ---------------------------------------------------------------------------------------------
// Cards

/// `*title*` (a link when the card's tap opens a URL), subtitle, text (Markdown), one per line.
fn card_text(
    ctx: &mut Ctx,
    title: Option<&str>,
    subtitle: Option<&str>,
    text: Option<&str>,
    tap: Option<&CardAction>,
    field: &str,
) -> String {
    let mut lines = Vec::new();
    let title = title.map(str::trim).filter(|t| !t.is_empty());
    let tap_url = tap
        .filter(|t| t.kind.takes_url())
        .and_then(CardAction::value_str);
    match (title, tap_url) {
        (Some(t), Some(url)) => lines.push(format!("*{}*", mrkdwn::link(url, t))),
        (Some(t), None) => lines.push(mrkdwn::bold(t)),
        (None, _) => {}
    }
    if let Some(tap) = tap
        && (tap_url.is_none() || title.is_none())
    {
        tap_ignored(ctx, tap, &format!("{field}.tap"));
    }
    if let Some(s) = subtitle.map(str::trim).filter(|s| !s.is_empty()) {
        lines.push(mrkdwn::escape(s));
    }
    if let Some(t) = text.filter(|t| !t.trim().is_empty()) {
        lines.push(mrkdwn::from_markdown(t.trim()));
    }
    lines.join("\n")
}

fn tap_ignored(ctx: &mut Ctx, tap: &CardAction, field: &str) {
    ctx.warn(
        "tap_ignored",
        field,
        format!(
            "Slack has no tap target for a `{}` action here: left out",
            action_name(tap.kind)
        ),
    );
}

/// Hero: an image block per image, a section (title, subtitle, text), then the buttons.
fn hero(
    ctx: &mut Ctx,
    card: &HeroCard,
    field: &str,
    origin: &str,
) -> Result<Vec<Value>, RenderError> {
    let mut blocks = Vec::new();
    for (j, img) in card.images.iter().enumerate() {
        blocks.push(card_image(
            ctx,
            img,
            card.title.as_deref(),
            &format!("{field}.images[{j}]"),
        )?);
    }
    let text = card_text(
        ctx,
        card.title.as_deref(),
        card.subtitle.as_deref(),
        card.text.as_deref(),
        card.tap.as_ref(),
        field,
    );
    if !text.is_empty() {
        let text = ctx.fit(text, SECTION_TEXT_MAX, &format!("{field}.text"));
        blocks.push(section(mrkdwn_text(&text)));
    }
    blocks.extend(buttons(
        ctx,
        &card.buttons,
        &format!("{field}.buttons"),
        origin,
    )?);
    Ok(blocks)
}

fn card_image(
    ctx: &mut Ctx,
    img: &CardImage,
    card_title: Option<&str>,
    field: &str,
) -> Result<Value, RenderError> {
    if let Some(tap) = &img.tap {
        tap_ignored(ctx, tap, &format!("{field}.tap"));
    }
    image_block(
        ctx,
        &img.url,
        img.alt.as_deref().or(card_title),
        None,
        field,
    )
}

/// Thumbnail: a section with the first image as its accessory, then the buttons.
fn thumbnail(
    ctx: &mut Ctx,
    card: &HeroCard,
    field: &str,
    origin: &str,
) -> Result<Vec<Value>, RenderError> {
    let mut blocks = Vec::new();
    let text = card_text(
        ctx,
        card.title.as_deref(),
        card.subtitle.as_deref(),
        card.text.as_deref(),
        card.tap.as_ref(),
        field,
    );
    let mut images = card.images.iter().enumerate();
    if text.is_empty() {
        // A section needs text: without any, the images stand as image blocks.
        for (j, img) in images.by_ref() {
            blocks.push(card_image(ctx, img, None, &format!("{field}.images[{j}]"))?);
        }
    } else {
        let text = ctx.fit(text, SECTION_TEXT_MAX, &format!("{field}.text"));
        let mut s = section(mrkdwn_text(&text));
        if let Some((j, img)) = images.next() {
            let f = format!("{field}.images[{j}]");
            check_url(&img.url, &format!("{f}.url"))?;
            if let Some(tap) = &img.tap {
                tap_ignored(ctx, tap, &format!("{f}.tap"));
            }
            let alt = img
                .alt
                .as_deref()
                .or(card.title.as_deref())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .unwrap_or("thumbnail");
            let alt = ctx.fit_plain(alt, IMAGE_TEXT_MAX, &format!("{f}.alt"), "text_truncated");
            s["accessory"] = image_element(&img.url, &alt);
        }
        blocks.push(s);
        // Further images follow the section rather than being lost.
        for (j, img) in images {
            blocks.push(card_image(ctx, img, None, &format!("{field}.images[{j}]"))?);
        }
    }
    blocks.extend(buttons(
        ctx,
        &card.buttons,
        &format!("{field}.buttons"),
        origin,
    )?);
    Ok(blocks)
}

/// Receipt: the title, then two-column fields (item | price, fact key | value, tax, VAT, total)
/// in sections of ten fields, then the buttons.
fn receipt(
    ctx: &mut Ctx,
    card: &ReceiptCard,
    field: &str,
    origin: &str,
) -> Result<Vec<Value>, RenderError> {
    let mut blocks = Vec::new();
    if let Some(t) = card.title.as_deref().filter(|t| !t.trim().is_empty()) {
        let text = ctx.fit(mrkdwn::bold(t), SECTION_TEXT_MAX, &format!("{field}.title"));
        blocks.push(section(mrkdwn_text(&text)));
    }
    if let Some(tap) = &card.tap {
        tap_ignored(ctx, tap, &format!("{field}.tap"));
    }
    // (text, field path) in reading order, two per row.
    let mut fields: Vec<(String, String)> = Vec::new();
    let mut images = 0usize;
    for (j, item) in card.items.iter().enumerate() {
        let f = format!("{field}.items[{j}]");
        if let Some(tap) = &item.tap {
            tap_ignored(ctx, tap, &format!("{f}.tap"));
        }
        images += usize::from(item.image.is_some());
        let mut name = item
            .title
            .as_deref()
            .map(mrkdwn::escape)
            .unwrap_or_default();
        if let Some(q) = item.quantity.as_deref().filter(|q| !q.trim().is_empty()) {
            name = format!("{name} × {}", mrkdwn::escape(q.trim()));
        }
        let mut lines = vec![name];
        for extra in [item.subtitle.as_deref(), item.text.as_deref()]
            .into_iter()
            .flatten()
            .filter(|s| !s.trim().is_empty())
        {
            lines.push(format!("_{}_", mrkdwn::escape(extra.trim())));
        }
        let left = lines
            .into_iter()
            .filter(|l| !l.is_empty())
            .collect::<Vec<_>>()
            .join("\n");
        let price = item
            .price
            .as_deref()
            .map(mrkdwn::escape)
            .unwrap_or_default();
        fields.push((left, format!("{f}.title")));
        fields.push((price, format!("{f}.price")));
    }
    if images > 0 {
        ctx.warn(
            "images_dropped",
            format!("{field}.items"),
            format!(
                "receipt items are rows of section fields, which hold no image: {images} item image{} left out",
                if images == 1 { "" } else { "s" }
            ),
        );
    }
    for (j, fact) in card.facts.iter().enumerate() {
        let f = format!("{field}.facts[{j}]");
        fields.push((mrkdwn::bold(&fact.key), format!("{f}.key")));
        fields.push((mrkdwn::escape(&fact.value), format!("{f}.value")));
    }
    for (label, value, name) in [
        ("Tax", card.tax.as_deref(), "tax"),
        ("VAT", card.vat.as_deref(), "vat"),
    ] {
        if let Some(v) = value.filter(|v| !v.trim().is_empty()) {
            fields.push((label.to_string(), format!("{field}.{name}")));
            fields.push((mrkdwn::escape(v), format!("{field}.{name}")));
        }
    }
    if let Some(total) = card.total.as_deref().filter(|v| !v.trim().is_empty()) {
        fields.push(("*Total*".to_string(), format!("{field}.total")));
        fields.push((mrkdwn::bold(total), format!("{field}.total")));
    }
    for chunk in fields.chunks(FIELDS_MAX) {
        let texts: Vec<Value> = chunk
            .iter()
            .map(|(text, f)| {
                // A field must not be empty: a blank cell keeps the two columns aligned.
                let t = if text.trim().is_empty() {
                    " "
                } else {
                    text.as_str()
                };
                let t = ctx.fit(t.to_string(), FIELD_TEXT_MAX, f);
                mrkdwn_text(&t)
            })
            .collect();
        blocks.push(json!({"type": "section", "fields": texts}));
    }
    blocks.extend(buttons(
        ctx,
        &card.buttons,
        &format!("{field}.buttons"),
        origin,
    )?);
    Ok(blocks)
}

fn text_and_buttons(
    ctx: &mut Ctx,
    text: &str,
    actions: &[CardAction],
    field: &str,
    origin: &str,
) -> Result<Vec<Value>, RenderError> {
    let text = ctx.fit(
        mrkdwn::from_markdown(text.trim()),
        SECTION_TEXT_MAX,
        &format!("{field}.text"),
    );
    let mut blocks = vec![section(mrkdwn_text(&text))];
    blocks.extend(buttons(ctx, actions, &format!("{field}.buttons"), origin)?);
    Ok(blocks)
}

#[derive(Clone, Copy)]
enum MediaKind {
    Animation,
    Audio,
    Video,
}

/// Audio / video / animation: a section with the card's text and a link per media URL, the
/// poster image as its accessory, then the buttons.
fn media(
    ctx: &mut Ctx,
    card: &MediaCard,
    kind: MediaKind,
    field: &str,
    origin: &str,
) -> Result<Vec<Value>, RenderError> {
    let mut text = card_text(
        ctx,
        card.title.as_deref(),
        card.subtitle.as_deref(),
        card.text.as_deref(),
        None,
        field,
    );
    let verb = match kind {
        MediaKind::Animation => "View animation",
        MediaKind::Audio => "Play audio",
        MediaKind::Video => "Play video",
    };
    let many = card.media.len() > 1;
    for (j, m) in card.media.iter().enumerate() {
        check_url(&m.url, &format!("{field}.media[{j}].url"))?;
        let label = match (m.profile.as_deref().filter(|p| !p.trim().is_empty()), many) {
            (Some(p), _) => format!("{verb} ({})", p.trim()),
            (None, true) => format!("{verb} {}", j + 1),
            (None, false) => verb.to_string(),
        };
        if !text.is_empty() {
            text.push('\n');
        }
        text.push_str(&mrkdwn::link(&m.url, &label));
    }
    let mut blocks = Vec::new();
    if text.is_empty() {
        if let Some(img) = &card.image {
            blocks.push(image_block(
                ctx,
                &img.url,
                img.alt.as_deref(),
                None,
                &format!("{field}.image"),
            )?);
        }
    } else {
        let text = ctx.fit(text, SECTION_TEXT_MAX, &format!("{field}.text"));
        let mut s = section(mrkdwn_text(&text));
        if let Some(img) = &card.image {
            check_url(&img.url, &format!("{field}.image.url"))?;
            let alt = img
                .alt
                .as_deref()
                .or(card.title.as_deref())
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .unwrap_or("poster");
            let alt = ctx.fit_plain(
                alt,
                IMAGE_TEXT_MAX,
                &format!("{field}.image.alt"),
                "text_truncated",
            );
            s["accessory"] = image_element(&img.url, &alt);
        }
        blocks.push(s);
    }
    blocks.extend(buttons(
        ctx,
        &card.buttons,
        &format!("{field}.buttons"),
        origin,
    )?);
    Ok(blocks)
}

// ---------------------------------------------------------------------------------------------
// Actions

/// The wire name of an action type, as it appears in `action_id`.
pub fn action_name(k: ActionType) -> &'static str {
    match k {
        ActionType::OpenUrl => "open_url",
        ActionType::ImBack => "im_back",
        ActionType::PostBack => "post_back",
        ActionType::Call => "call",
        ActionType::PlayAudio => "play_audio",
        ActionType::PlayVideo => "play_video",
        ActionType::ShowImage => "show_image",
        ActionType::DownloadFile => "download_file",
        ActionType::Signin => "signin",
        ActionType::MessageBack => "message_back",
        ActionType::DialogAction => "dialog_action",
    }
}

/// Actions blocks for a list of buttons (25 per block), followed by a context block for call
/// actions (Slack buttons cannot dial). `field` names the list (`...buttons`), `origin` the
/// attachment (`message.attachments[0]`) or `message.suggested_actions`.
pub fn buttons(
    ctx: &mut Ctx,
    actions: &[CardAction],
    field: &str,
    origin: &str,
) -> Result<Vec<Value>, RenderError> {
    let origin_tag = origin_tag(origin);
    let mut elements = Vec::new();
    let mut calls = Vec::new();
    for (j, a) in actions.iter().enumerate() {
        let f = format!("{field}[{j}]");
        if a.kind == ActionType::Call {
            let number = a
                .value_str()
                .unwrap_or_default()
                .trim_start_matches("tel:")
                .to_string();
            let title = a
                .title
                .as_deref()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or("Call");
            calls.push(mrkdwn_text(&format!(
                "{}: {}",
                mrkdwn::escape(title.trim()),
                mrkdwn::escape(&number)
            )));
            ctx.warn(
                "call_as_text",
                f,
                "Slack buttons cannot place a call: the number is shown as text below the buttons",
            );
            continue;
        }
        elements.push(button(ctx, a, &f, &format!("{origin_tag}{j}"))?);
    }
    let mut blocks: Vec<Value> = Vec::new();
    if elements.len() > ACTIONS_MAX {
        ctx.warn(
            "buttons_split",
            field,
            format!(
                "{} buttons; a Slack actions block holds at most {ACTIONS_MAX}: continued in {} right after it",
                elements.len(),
                more(elements.len().div_ceil(ACTIONS_MAX) - 1, "actions block", "actions blocks")
            ),
        );
    }
    for chunk in elements.chunks(ACTIONS_MAX) {
        blocks.push(json!({"type": "actions", "elements": chunk}));
    }
    for chunk in calls.chunks(CONTEXT_MAX) {
        blocks.push(json!({"type": "context", "elements": chunk}));
    }
    Ok(blocks)
}

/// `a{i}.b` for a card of attachment i, `sa` for suggested actions: the third part of an
/// `action_id`, followed by the button's index.
fn origin_tag(origin: &str) -> String {
    match origin
        .strip_prefix("message.attachments[")
        .and_then(|r| r.strip_suffix(']'))
    {
        Some(i) => format!("a{i}.b"),
        None => "sa".to_string(),
    }
}

/// One button. URL actions open their URL; the others carry a value that Slack gives back in the
/// `block_actions` payload, with `action_id` = `{type}:{ordinal}:{origin}` (e.g.
/// `post_back:2:a0.b1`: the message's third button, button 1 of attachment 0).
fn button(ctx: &mut Ctx, a: &CardAction, field: &str, origin: &str) -> Result<Value, RenderError> {
    let name = action_name(a.kind);
    let action_id = format!("{name}:{}:{origin}", ctx.buttons);
    ctx.buttons += 1;
    if action_id.chars().count() > ACTION_ID_MAX {
        return Err(RenderError::invalid(
            field,
            format!("action_id would exceed {ACTION_ID_MAX} characters"),
        ));
    }
    let title = a
        .title
        .as_deref()
        .map(str::trim)
        .filter(|t| !t.is_empty())
        .map(String::from)
        .or_else(|| a.display_text.clone().filter(|t| !t.trim().is_empty()))
        .or_else(|| a.text.clone().filter(|t| !t.trim().is_empty()))
        .or_else(|| {
            a.value_str()
                .map(String::from)
                .filter(|t| !t.trim().is_empty())
        })
        .unwrap_or_else(|| name.to_string());
    let title = ctx.fit_plain(
        title.trim(),
        BUTTON_TEXT_MAX,
        &format!("{field}.title"),
        "button_text_truncated",
    );
    let mut b = json!({"type": "button", "text": plain_text(&title), "action_id": action_id});
    if a.kind.takes_url() {
        let url = a.value_str().unwrap_or_default();
        if url.is_empty() {
            return Err(RenderError::invalid(
                format!("{field}.value"),
                "required: a URL for this action type",
            ));
        }
        check_url(url, &format!("{field}.value"))?;
        b["url"] = Value::String(url.to_string());
        return Ok(b);
    }
    let value = button_value(a, field)?;
    let n = value.chars().count();
    if n > BUTTON_VALUE_MAX {
        return Err(RenderError::invalid(
            format!("{field}.value"),
            format!(
                "{n} characters once encoded; a Slack button value holds at most {BUTTON_VALUE_MAX}"
            ),
        ));
    }
    if !value.is_empty() {
        b["value"] = Value::String(value);
    }
    Ok(b)
}

/// What a click gives back: the value for im_back / post_back, `action?NAME=DATA` for a dialog
/// action, and for message_back a JSON object `{text, display_text, value}` (its present parts),
/// since all three travel in the one `value`.
fn button_value(a: &CardAction, field: &str) -> Result<String, RenderError> {
    Ok(match a.kind {
        ActionType::DialogAction => a.dialog_action_value(),
        ActionType::MessageBack => {
            let mut o = serde_json::Map::new();
            if let Some(t) = a.text.as_deref() {
                o.insert("text".into(), Value::String(t.into()));
            }
            if let Some(t) = a.display_text.as_deref() {
                o.insert("display_text".into(), Value::String(t.into()));
            }
            if let Some(v) = a.value.clone().filter(|v| !v.is_null()) {
                o.insert("value".into(), v);
            }
            serde_json::to_string(&Value::Object(o)).map_err(|e| {
                RenderError::invalid(format!("{field}.value"), format!("cannot be encoded: {e}"))
            })?
        }
        _ => match &a.value {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Null) | None => String::new(),
            Some(other) => other.to_string(),
        },
    })
}
