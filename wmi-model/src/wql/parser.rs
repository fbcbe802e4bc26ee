//! The WQL grammar.
//!
//! ```text
//! query      := select | assoc
//! select     := SELECT (* | prop {, prop}) FROM class [WHERE expr]
//! expr       := term {OR term};  term := factor {AND factor};  factor := NOT factor | primary
//! primary    := ( expr ) | operand op operand | prop IS [NOT] NULL | prop [NOT] LIKE string
//!             | prop ISA class
//! assoc      := (ASSOCIATORS | REFERENCES) OF {path} [WHERE keyword…]
//! keyword    := AssocClass = c | ResultClass = c | ResultRole = p | Role = p
//!             | RequiredQualifier = q | RequiredAssocQualifier = q | ClassDefsOnly | KeysOnly
//! ```

use super::WqlError;
use super::lexer::{Spanned, Token, tokenize};
use crate::path::ObjectPath;

/// A parsed query.
#[derive(Debug, Clone, PartialEq)]
pub enum Query {
    /// `SELECT … FROM … [WHERE …]`.
    Select(Select),
    /// `ASSOCIATORS OF {…}`.
    Associators(AssocQuery),
    /// `REFERENCES OF {…}`.
    References(AssocQuery),
}

/// A `SELECT` query.
#[derive(Debug, Clone, PartialEq)]
pub struct Select {
    /// The property list; `None` for `*`.
    pub properties: Option<Vec<String>>,
    /// The class after `FROM`.
    pub class: String,
    /// The `WHERE` clause.
    pub condition: Option<Expr>,
}

/// An `ASSOCIATORS OF` / `REFERENCES OF` query.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct AssocQuery {
    /// The source object.
    pub object: ObjectPath,
    /// `AssocClass`.
    pub assoc_class: Option<String>,
    /// `ResultClass`.
    pub result_class: Option<String>,
    /// `Role`.
    pub role: Option<String>,
    /// `ResultRole`.
    pub result_role: Option<String>,
    /// `RequiredQualifier`.
    pub required_qualifier: Option<String>,
    /// `RequiredAssocQualifier`.
    pub required_assoc_qualifier: Option<String>,
    /// `ClassDefsOnly`.
    pub class_defs_only: bool,
    /// `KeysOnly`.
    pub keys_only: bool,
}

/// A comparison operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// `=`.
    Eq,
    /// `<>` or `!=`.
    Ne,
    /// `<`.
    Lt,
    /// `>`.
    Gt,
    /// `<=`.
    Le,
    /// `>=`.
    Ge,
}

/// A literal value.
#[derive(Debug, Clone, PartialEq)]
pub enum Literal {
    /// A quoted string.
    String(String),
    /// An integer.
    Integer(i128),
    /// A real.
    Real(f64),
    /// `TRUE` / `FALSE`.
    Boolean(bool),
    /// `NULL`.
    Null,
}

/// One side of a comparison.
#[derive(Debug, Clone, PartialEq)]
pub enum Operand {
    /// A property, possibly through embedded instances (`SourceInstance.EnabledState`).
    Property(Vec<String>),
    /// A literal.
    Literal(Literal),
}

/// A `WHERE` expression.
#[derive(Debug, Clone, PartialEq)]
pub enum Expr {
    /// `a AND b`.
    And(Box<Expr>, Box<Expr>),
    /// `a OR b`.
    Or(Box<Expr>, Box<Expr>),
    /// `NOT a`.
    Not(Box<Expr>),
    /// `left op right`.
    Compare(Operand, Op, Operand),
    /// `prop IS [NOT] NULL` (`true` for IS NULL).
    IsNull(Vec<String>, bool),
    /// `prop LIKE 'pattern'`.
    Like(Vec<String>, String),
    /// `prop ISA 'Class'`.
    Isa(Vec<String>, String),
}

struct Parser {
    tokens: Vec<Spanned>,
    at: usize,
    end: usize,
}

/// Parses a WQL query.
pub fn parse(text: &str) -> Result<Query, WqlError> {
    let tokens = tokenize(text)?;
    let mut parser = Parser {
        tokens,
        at: 0,
        end: text.chars().count(),
    };
    let query = parser.query()?;
    if let Some(extra) = parser.tokens.get(parser.at) {
        return Err(WqlError {
            position: extra.position,
            message: "unexpected text after the query".into(),
        });
    }
    Ok(query)
}

impl Parser {
    fn position(&self) -> usize {
        self.tokens.get(self.at).map_or(self.end, |t| t.position)
    }

    fn error<T>(&self, message: impl Into<String>) -> Result<T, WqlError> {
        Err(WqlError {
            position: self.position(),
            message: message.into(),
        })
    }

    fn peek(&self) -> Option<&Token> {
        self.tokens.get(self.at).map(|t| &t.token)
    }

    fn next(&mut self) -> Option<Token> {
        let token = self.tokens.get(self.at).map(|t| t.token.clone());
        if token.is_some() {
            self.at += 1;
        }
        token
    }

    fn is_keyword(&self, keyword: &str) -> bool {
        matches!(self.peek(), Some(Token::Ident(w)) if w.eq_ignore_ascii_case(keyword))
    }

    fn eat_keyword(&mut self, keyword: &str) -> bool {
        let found = self.is_keyword(keyword);
        if found {
            self.at += 1;
        }
        found
    }

    fn expect_keyword(&mut self, keyword: &str) -> Result<(), WqlError> {
        if self.eat_keyword(keyword) {
            Ok(())
        } else {
            self.error(format!("expected {keyword}"))
        }
    }

    fn ident(&mut self, what: &str) -> Result<String, WqlError> {
        match self.peek() {
            Some(Token::Ident(name)) => {
                let name = name.clone();
                self.at += 1;
                Ok(name)
            }
            _ => self.error(format!("expected {what}")),
        }
    }

    fn query(&mut self) -> Result<Query, WqlError> {
        if self.eat_keyword("SELECT") {
            return self.select().map(Query::Select);
        }
        if self.eat_keyword("ASSOCIATORS") {
            return self.assoc().map(Query::Associators);
        }
        if self.eat_keyword("REFERENCES") {
            return self.assoc().map(Query::References);
        }
        self.error("expected SELECT, ASSOCIATORS OF or REFERENCES OF")
    }

    fn select(&mut self) -> Result<Select, WqlError> {
        let properties = if self.peek() == Some(&Token::Star) {
            self.at += 1;
            None
        } else {
            let mut list = vec![self.ident("a property name or *")?];
            while self.peek() == Some(&Token::Comma) {
                self.at += 1;
                list.push(self.ident("a property name")?);
            }
            Some(list)
        };
        self.expect_keyword("FROM")?;
        let class = self.ident("a class name")?;
        let condition = if self.eat_keyword("WHERE") {
            Some(self.or()?)
        } else {
            None
        };
        Ok(Select {
            properties,
            class,
            condition,
        })
    }

    fn assoc(&mut self) -> Result<AssocQuery, WqlError> {
        self.expect_keyword("OF")?;
        let position = self.position();
        let Some(Token::Path(text)) = self.next() else {
            self.at = self.at.saturating_sub(1);
            return self.error("expected {object path}");
        };
        let object = ObjectPath::parse(&text).map_err(|e| WqlError {
            position: position + 1 + e.position,
            message: format!("bad object path: expected {}", e.message),
        })?;
        let mut query = AssocQuery {
            object,
            ..AssocQuery::default()
        };
        if !self.eat_keyword("WHERE") {
            return Ok(query);
        }
        if self.peek().is_none() {
            return self.error("expected a keyword after WHERE");
        }
        while let Some(token) = self.peek() {
            let Token::Ident(word) = token else {
                return self.error("expected AssocClass, ResultClass, Role, ResultRole, RequiredQualifier, RequiredAssocQualifier, ClassDefsOnly or KeysOnly");
            };
            let word = word.to_ascii_lowercase();
            self.at += 1;
            match word.as_str() {
                "classdefsonly" => query.class_defs_only = true,
                "keysonly" => query.keys_only = true,
                "assocclass"
                | "resultclass"
                | "role"
                | "resultrole"
                | "requiredqualifier"
                | "requiredassocqualifier" => {
                    if self.next() != Some(Token::Op("=")) {
                        self.at = self.at.saturating_sub(1);
                        return self.error("expected '='");
                    }
                    let value = self.ident("a name")?;
                    let slot = match word.as_str() {
                        "assocclass" => &mut query.assoc_class,
                        "resultclass" => &mut query.result_class,
                        "role" => &mut query.role,
                        "resultrole" => &mut query.result_role,
                        "requiredqualifier" => &mut query.required_qualifier,
                        _ => &mut query.required_assoc_qualifier,
                    };
                    *slot = Some(value);
                }
                _ => {
                    self.at -= 1;
                    return self.error("expected AssocClass, ResultClass, Role, ResultRole, RequiredQualifier, RequiredAssocQualifier, ClassDefsOnly or KeysOnly");
                }
            }
        }
        if query.class_defs_only && query.result_class.is_some() {
            return Err(WqlError {
                position: self.end,
                message: "ClassDefsOnly and ResultClass cannot be combined".into(),
            });
        }
        Ok(query)
    }

    fn or(&mut self) -> Result<Expr, WqlError> {
        let mut left = self.and()?;
        while self.eat_keyword("OR") {
            left = Expr::Or(Box::new(left), Box::new(self.and()?));
        }
        Ok(left)
    }

    fn and(&mut self) -> Result<Expr, WqlError> {
        let mut left = self.not()?;
        while self.eat_keyword("AND") {
            left = Expr::And(Box::new(left), Box::new(self.not()?));
        }
        Ok(left)
    }

    fn not(&mut self) -> Result<Expr, WqlError> {
        if self.eat_keyword("NOT") {
            return Ok(Expr::Not(Box::new(self.not()?)));
        }
        self.primary()
    }

    fn primary(&mut self) -> Result<Expr, WqlError> {
        if self.peek() == Some(&Token::LParen) {
            self.at += 1;
            let inner = self.or()?;
            if self.next() != Some(Token::RParen) {
                self.at = self.at.saturating_sub(1);
                return self.error("expected ')'");
            }
            return Ok(inner);
        }
        let left = self.operand()?;
        if let Operand::Property(path) = &left {
            if self.eat_keyword("IS") {
                let negated = self.eat_keyword("NOT");
                self.expect_keyword("NULL")?;
                return Ok(Expr::IsNull(path.clone(), !negated));
            }
            if self.eat_keyword("ISA") {
                let class = match self.next() {
                    Some(Token::Ident(c) | Token::Str(c)) => c,
                    _ => {
                        self.at = self.at.saturating_sub(1);
                        return self.error("expected a class name after ISA");
                    }
                };
                return Ok(Expr::Isa(path.clone(), class));
            }
            let not_like = self.is_keyword("NOT");
            if not_like {
                self.at += 1;
            }
            if self.eat_keyword("LIKE") {
                let Some(Token::Str(pattern)) = self.next() else {
                    self.at = self.at.saturating_sub(1);
                    return self.error("expected a quoted pattern after LIKE");
                };
                let like = Expr::Like(path.clone(), pattern);
                return Ok(if not_like {
                    Expr::Not(Box::new(like))
                } else {
                    like
                });
            }
            if not_like {
                return self.error("expected LIKE after NOT");
            }
        }
        let op = match self.next() {
            Some(Token::Op(op)) => match op {
                "=" => Op::Eq,
                "<>" => Op::Ne,
                "<" => Op::Lt,
                ">" => Op::Gt,
                "<=" => Op::Le,
                _ => Op::Ge,
            },
            _ => {
                self.at = self
                    .at
                    .saturating_sub(1)
                    .max(self.at.min(self.tokens.len()));
                return self.error("expected a comparison operator");
            }
        };
        let right = self.operand()?;
        Ok(Expr::Compare(left, op, right))
    }

    fn operand(&mut self) -> Result<Operand, WqlError> {
        let literal = match self.peek() {
            Some(Token::Str(s)) => Literal::String(s.clone()),
            Some(Token::Int(i)) => Literal::Integer(*i),
            Some(Token::Real(r)) => Literal::Real(*r),
            Some(Token::Ident(word)) => {
                let word = word.clone();
                if word.eq_ignore_ascii_case("TRUE") {
                    Literal::Boolean(true)
                } else if word.eq_ignore_ascii_case("FALSE") {
                    Literal::Boolean(false)
                } else if word.eq_ignore_ascii_case("NULL") {
                    Literal::Null
                } else {
                    self.at += 1;
                    let mut path = vec![word];
                    while self.peek() == Some(&Token::Dot) {
                        self.at += 1;
                        path.push(self.ident("a property name after '.'")?);
                    }
                    return Ok(Operand::Property(path));
                }
            }
            _ => return self.error("expected a property name or a value"),
        };
        self.at += 1;
        Ok(Operand::Literal(literal))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn select_with_property_list_and_mixed_case_keywords() {
        let query = parse("select Name, EnabledState FROM Msvm_ComputerSystem wHeRe EnabledState != 0 AND EnabledState <> 3")
            .expect("valid");

        let Query::Select(select) = query else {
            panic!("select expected");
        };
        assert_eq!(
            select.properties,
            Some(vec!["Name".into(), "EnabledState".into()])
        );
        assert_eq!(select.class, "Msvm_ComputerSystem");
        assert!(matches!(select.condition, Some(Expr::And(..))));
    }

    #[test]
    fn both_quote_styles_give_the_same_literal() {
        let single = parse("SELECT * FROM C WHERE ElementName = 'vm1'").expect("valid");
        let double = parse("SELECT * FROM C WHERE ElementName = \"vm1\"").expect("valid");

        assert_eq!(single, double);
    }

    #[test]
    fn is_not_null_and_like_and_not() {
        let query =
            parse("SELECT * FROM C WHERE NOT (ProcessID IS NOT NULL) OR ElementName LIKE 'web%'")
                .expect("valid");

        let Query::Select(Select {
            condition: Some(Expr::Or(left, right)),
            ..
        }) = query
        else {
            panic!("or expected");
        };
        assert_eq!(
            *left,
            Expr::Not(Box::new(Expr::IsNull(vec!["ProcessID".into()], false)))
        );
        assert_eq!(
            *right,
            Expr::Like(vec!["ElementName".into()], "web%".into())
        );
    }

    #[test]
    fn associators_of_with_every_keyword() {
        let query = parse("ASSOCIATORS OF {Msvm_ComputerSystem.CreationClassName='Msvm_ComputerSystem',Name='X'} WHERE AssocClass = Msvm_SettingsDefineState ResultClass = Msvm_VirtualSystemSettingData Role = ManagedElement ResultRole = SettingData RequiredQualifier = Q")
            .expect("valid");

        let Query::Associators(assoc) = query else {
            panic!("associators expected");
        };
        assert_eq!(assoc.object.key("Name"), Some("X"));
        assert_eq!(
            assoc.assoc_class.as_deref(),
            Some("Msvm_SettingsDefineState")
        );
        assert_eq!(assoc.result_role.as_deref(), Some("SettingData"));
        assert_eq!(assoc.required_qualifier.as_deref(), Some("Q"));
    }

    #[test]
    fn classdefsonly_with_resultclass_is_refused() {
        assert!(parse("ASSOCIATORS OF {C.K='v'} WHERE ClassDefsOnly ResultClass = X").is_err());
    }

    #[test]
    fn error_points_at_the_bad_token() {
        let error = parse("SELECT * FROM Msvm_ComputerSystem WHERE = 3").expect_err("invalid");

        assert_eq!(error.position, 40);
    }

    #[test]
    fn missing_from_is_reported_at_end() {
        let error = parse("SELECT *").expect_err("invalid");

        assert_eq!(error.position, 8);
        assert!(error.message.contains("FROM"));
    }
}
