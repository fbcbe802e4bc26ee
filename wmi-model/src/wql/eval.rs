//! Evaluating a `WHERE` clause against an instance.

use std::cmp::Ordering;

use super::parser::{Expr, Literal, Op, Operand};
use crate::instance::Instance;
use crate::schema::{Namespace, Schema};
use crate::value::{CimValue, Scalar};

/// A value during evaluation.
#[derive(Debug, Clone, PartialEq)]
enum Value {
    Null,
    Text(String),
    Number(f64),
    Boolean(bool),
}

impl Expr {
    /// Whether `instance` satisfies this expression.
    pub fn matches(&self, instance: &Instance) -> bool {
        match self {
            Expr::And(a, b) => a.matches(instance) && b.matches(instance),
            Expr::Or(a, b) => a.matches(instance) || b.matches(instance),
            Expr::Not(a) => !a.matches(instance),
            Expr::IsNull(path, want_null) => lookup(instance, path).is_none() == *want_null,
            Expr::Like(path, pattern) => values(instance, path)
                .iter()
                .any(|v| matches!(v, Value::Text(t) if like(t, pattern))),
            Expr::Isa(path, class) => match resolve(instance, path) {
                Some(CimValue::Scalar(Scalar::Instance(inner))) => is_a(&inner.class, class),
                _ => false,
            },
            Expr::Compare(left, op, right) => {
                let lefts = operand(instance, left);
                let rights = operand(instance, right);
                lefts
                    .iter()
                    .any(|l| rights.iter().any(|r| compare(l, *op, r)))
            }
        }
    }
}

fn is_a(actual: &str, wanted: &str) -> bool {
    let schema = Schema::get();
    [Namespace::Virtualization, Namespace::Interop]
        .into_iter()
        .filter_map(|ns| schema.class(ns, actual))
        .any(|decl| decl.is_a(wanted))
        || actual.eq_ignore_ascii_case(wanted)
}

fn resolve<'a>(instance: &'a Instance, path: &[String]) -> Option<&'a CimValue> {
    let (first, rest) = path.split_first()?;
    let value = instance.get(first)?;
    if rest.is_empty() {
        return Some(value);
    }
    match value {
        CimValue::Scalar(Scalar::Instance(inner)) => resolve(inner, rest),
        _ => None,
    }
}

fn lookup(instance: &Instance, path: &[String]) -> Option<Vec<Value>> {
    let value = resolve(instance, path)?;
    Some(match value {
        CimValue::Scalar(s) => vec![scalar(s)],
        CimValue::Array(list) => list.iter().map(scalar).collect(),
    })
}

fn values(instance: &Instance, path: &[String]) -> Vec<Value> {
    lookup(instance, path).unwrap_or_else(|| vec![Value::Null])
}

fn operand(instance: &Instance, operand: &Operand) -> Vec<Value> {
    match operand {
        Operand::Property(path) => values(instance, path),
        Operand::Literal(literal) => vec![match literal {
            Literal::String(s) => Value::Text(s.clone()),
            Literal::Integer(i) => Value::Number(*i as f64),
            Literal::Real(r) => Value::Number(*r),
            Literal::Boolean(b) => Value::Boolean(*b),
            Literal::Null => Value::Null,
        }],
    }
}

fn scalar(value: &Scalar) -> Value {
    match value {
        Scalar::Boolean(b) => Value::Boolean(*b),
        Scalar::Integer(i) => Value::Number(*i as f64),
        other => Value::Text(other.to_text()),
    }
}

fn compare(left: &Value, op: Op, right: &Value) -> bool {
    let ordering = match (left, right) {
        (Value::Null, _) | (_, Value::Null) => return false,
        (Value::Number(a), Value::Number(b)) => a.partial_cmp(b),
        (Value::Number(a), Value::Text(t)) => {
            t.trim().parse::<f64>().ok().and_then(|b| a.partial_cmp(&b))
        }
        (Value::Text(t), Value::Number(b)) => {
            t.trim().parse::<f64>().ok().and_then(|a| a.partial_cmp(b))
        }
        (Value::Text(a), Value::Text(b)) => Some(a.to_lowercase().cmp(&b.to_lowercase())),
        (Value::Boolean(a), Value::Boolean(b)) => Some(a.cmp(b)),
        (Value::Boolean(a), Value::Text(t)) | (Value::Text(t), Value::Boolean(a)) => {
            return match op {
                Op::Eq => t.eq_ignore_ascii_case(if *a { "true" } else { "false" }),
                Op::Ne => !t.eq_ignore_ascii_case(if *a { "true" } else { "false" }),
                _ => false,
            };
        }
        _ => None,
    };
    let Some(ordering) = ordering else {
        return false;
    };
    match op {
        Op::Eq => ordering == Ordering::Equal,
        Op::Ne => ordering != Ordering::Equal,
        Op::Lt => ordering == Ordering::Less,
        Op::Gt => ordering == Ordering::Greater,
        Op::Le => ordering != Ordering::Greater,
        Op::Ge => ordering != Ordering::Less,
    }
}

/// WQL `LIKE`: `%` any run, `_` one character, `[abc]` / `[a-z]` / `[^…]` a set; case ignored.
fn like(text: &str, pattern: &str) -> bool {
    let text: Vec<char> = text.to_lowercase().chars().collect();
    let pattern: Vec<char> = pattern.to_lowercase().chars().collect();
    like_at(&text, &pattern)
}

fn like_at(text: &[char], pattern: &[char]) -> bool {
    // Iterative with one backtrack point for '%', so hostile patterns stay linear-ish.
    let (mut t, mut p) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while t < text.len() {
        if p < pattern.len() && pattern[p] == '%' {
            star = Some((p, t));
            p += 1;
            continue;
        }
        if p < pattern.len()
            && let Some(used) = single(text[t], &pattern[p..])
        {
            t += 1;
            p += used;
            continue;
        }
        match star {
            Some((sp, st)) => {
                p = sp + 1;
                t = st + 1;
                star = Some((sp, st + 1));
            }
            None => return false,
        }
    }
    pattern[p..].iter().all(|c| *c == '%')
}

/// Whether `c` matches the single-character element at the start of `pattern`; returns how
/// many pattern characters that element used.
fn single(c: char, pattern: &[char]) -> Option<usize> {
    match pattern[0] {
        '_' => Some(1),
        '[' => {
            let close = pattern.iter().position(|ch| *ch == ']')?;
            let set = &pattern[1..close];
            let (negate, set) = match set.split_first() {
                Some(('^', rest)) => (true, rest),
                _ => (false, set),
            };
            let mut hit = false;
            let mut i = 0;
            while i < set.len() {
                if i + 2 < set.len() && set[i + 1] == '-' {
                    hit |= (set[i]..=set[i + 2]).contains(&c);
                    i += 3;
                } else {
                    hit |= set[i] == c;
                    i += 1;
                }
            }
            (hit != negate).then_some(close + 1)
        }
        other => (other == c).then_some(1),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::value::CimType;
    use crate::wql::{Query, parse};

    fn vm(name: &str, state: u16, pid: Option<u32>) -> Instance {
        Instance::new("Msvm_ComputerSystem")
            .string("ElementName", Some(name))
            .integer("EnabledState", CimType::Uint16, Some(state))
            .integer("ProcessID", CimType::Uint32, pid)
    }

    fn selects(query: &str, instance: &Instance) -> bool {
        match parse(query).expect("valid query") {
            Query::Select(select) => select.condition.is_none_or(|c| c.matches(instance)),
            _ => panic!("select expected"),
        }
    }

    #[test]
    fn string_equality_ignores_case() {
        assert!(selects(
            "SELECT * FROM C WHERE ElementName = 'WEB1'",
            &vm("web1", 2, None)
        ));
    }

    #[test]
    fn numeric_comparisons_use_numbers() {
        let running = vm("a", 2, Some(7));

        assert!(selects(
            "SELECT * FROM C WHERE EnabledState < 3 AND EnabledState >= 2",
            &running
        ));
        assert!(!selects(
            "SELECT * FROM C WHERE EnabledState != 2",
            &running
        ));
    }

    #[test]
    fn null_compares_false_but_is_null_holds() {
        let off = vm("a", 3, None);

        assert!(!selects("SELECT * FROM C WHERE ProcessID <> 5", &off));
        assert!(selects("SELECT * FROM C WHERE ProcessID IS NULL", &off));
    }

    #[test]
    fn like_supports_percent_underscore_and_sets() {
        assert!(like("web12", "web%"));
        assert!(like("web12", "w_b[0-9]2"));
        assert!(!like("web12", "web[^1]%"));
        assert!(like("a%b", "a[%]b"));
    }

    #[test]
    fn isa_checks_embedded_instance_ancestry() {
        let indication = Instance::new("CIM_InstModification")
            .embedded("SourceInstance", Some(vm("a", 2, None)));

        assert!(selects(
            "SELECT * FROM CIM_InstModification WHERE SourceInstance ISA 'CIM_ComputerSystem' AND SourceInstance.EnabledState = 2",
            &indication
        ));
    }
}
