using System.CommandLine;
using System.CommandLine.Completions;
using System.CommandLine.Help;
using System.Reflection;
using System.Text;

namespace Vmsnap.Cli;

/// <summary>
/// The manual page vmsnap(1) and the bash completion script, written from the same command definitions the
/// parser uses (hidden options <c>--help-man</c> and <c>--help-bash-completion</c>; packaging/build-deb.sh
/// ships their output), so neither can drift from the commands.
/// </summary>
internal static class CommandReference
{
    /// <summary>Adds the two hidden options that print the manual page and the completion script to <paramref name="root"/>.</summary>
    internal static void AddTo(RootCommand root)
    {
        root.Options.Add(new Option<bool>("--help-man") { Hidden = true, Action = new Print(ManPage) });
        root.Options.Add(new Option<bool>("--help-bash-completion") { Hidden = true, Action = new Print(BashCompletion) });
    }

    private sealed class Print(Func<RootCommand, string> text) : System.CommandLine.Invocation.SynchronousCommandLineAction
    {
        public override bool Terminating => true;

        public override int Invoke(ParseResult parseResult)
        {
            parseResult.InvocationConfiguration.Output.Write(text((RootCommand)parseResult.RootCommandResult.Command));
            return Cli.ExitOk;
        }
    }

    /// <summary>A visible command with the words that reach it (<c>snapshot list</c>).</summary>
    internal sealed record Entry(string Path, Command Command);

    /// <summary>Every visible command below <paramref name="root"/>, depth first, in definition order.</summary>
    internal static IEnumerable<Entry> Commands(Command root)
    {
        foreach (Command c in root.Subcommands.Where(c => !c.Hidden))
        {
            string path = root is RootCommand ? c.Name : $"{PathOf(root)} {c.Name}";
            yield return new Entry(path, c);
            foreach (Entry e in Commands(c)) yield return e;
        }
    }

    private static string PathOf(Command c) =>
        c.Parents.OfType<Command>().FirstOrDefault() is { } parent and not RootCommand ? $"{PathOf(parent)} {c.Name}" : c.Name;

    /// <summary>The options a command takes: its own, then those its ancestors pass down (<see cref="Option.Recursive"/>), hidden ones left out.</summary>
    internal static IReadOnlyList<Option> OptionsOf(Command command)
    {
        var options = new List<Option>(command.Options.Where(o => !o.Hidden));
        for (Command? c = command.Parents.OfType<Command>().FirstOrDefault(); c is not null; c = c.Parents.OfType<Command>().FirstOrDefault())
            options.AddRange(c.Options.Where(o => o.Recursive && !o.Hidden && options.All(x => x.Name != o.Name)));
        return options;
    }

    /// <summary>The words an option's value is one of (<c>--compat</c>: 0.10, 1.1), or empty when any value goes.</summary>
    internal static IReadOnlyList<string> ChoicesOf(Option option) =>
        option.ValueType == typeof(bool) ? [] : [.. option.GetCompletions(CompletionContext.Empty).Select(c => c.Label)];

    /// <summary>True when the option takes a value (every option but a flag and --help).</summary>
    internal static bool TakesValue(Option option) => option.ValueType != typeof(bool) && option is not HelpOption and not VersionOption;

    /// <summary>The name of an option's value as help shows it: its choices (<c>0.10|1.1</c>), or its name in capitals (<c>CLUSTER-SIZE</c>).</summary>
    private static string ValueName(Option option) =>
        ChoicesOf(option) is { Count: > 0 } choices ? string.Join('|', choices) : (option.HelpName ?? option.Name.TrimStart('-')).ToUpperInvariant();

    internal static string Version =>
        typeof(CommandReference).Assembly.GetCustomAttribute<AssemblyInformationalVersionAttribute>()?.InformationalVersion.Split('+')[0] ?? "0";

    // ---- the manual page ------------------------------------------------------------------------

    /// <summary>vmsnap(1) in man(7) markup.</summary>
    internal static string ManPage(RootCommand root)
    {
        var m = new StringBuilder();
        string summary = root.Description!.TrimEnd('.');
        if (summary.StartsWith("vmsnap: ", StringComparison.Ordinal)) summary = summary["vmsnap: ".Length..];
        m.Append(".\\\" Written by vmsnap --help-man from the command definitions; do not edit.\n");
        m.Append($".TH VMSNAP 1 \"\" \"vmsnap {Version}\" \"User Commands\"\n");
        m.Append(".SH NAME\n").Append("vmsnap \\- ").Append(Roff(summary)).Append('\n');
        m.Append(".SH SYNOPSIS\n");
        foreach (Entry e in Commands(root).Where(e => e.Command.Subcommands.Count == 0))
            m.Append(".B vmsnap\n").Append(Roff(Usage(e, withProgram: false))).Append("\n.br\n");
        m.Append(".B vmsnap\n\\-\\-help | \\-\\-version\n");
        m.Append(".SH DESCRIPTION\n").Append(Text($"{char.ToUpperInvariant(summary[0])}{summary[1..]}.")).Append('\n');
        m.Append(".PP\n").Append(Text(
            "Every command takes --json (or qemu-img's --output=json) for machine-readable output and shows progress on a terminal for long operations. " +
            "Images a running QEMU holds are refused for writing (QEMU's own OFD lock protocol); -U reads them anyway. " +
            "Every command's --help lists its arguments, options and exit codes.")).Append('\n');
        m.Append(".SH COMMANDS\n");
        foreach (Entry e in Commands(root))
        {
            m.Append(".SS \"").Append(Roff(Usage(e, withProgram: true))).Append("\"\n");
            if (!string.IsNullOrEmpty(e.Command.Description)) m.Append(Text(e.Command.Description)).Append('\n');
            if (e.Command.Subcommands.Count > 0) continue;
            foreach (Argument a in e.Command.Arguments.Where(a => !a.Hidden))
                m.Append(".TP\n.I ").Append(Roff(a.Name)).Append('\n').Append(Text(a.Description ?? "")).Append('\n');
            foreach (Option o in OptionsOf(e.Command).Where(o => o is not HelpOption && !o.Recursive))
                AppendOption(m, o);
            IReadOnlyList<(int Code, string Meaning)> codes = Cli.ExitCodesOf(e.Command);
            if (!codes.SequenceEqual(Cli.ExitCodes))
            {
                m.Append(".PP\nExit status:\n");
                foreach (var (code, meaning) in codes) m.Append(".TP\n.B ").Append(code).Append('\n').Append(Text(meaning)).Append('\n');
            }
        }
        m.Append(".SH OPTIONS\nEvery command takes these.\n");
        foreach (Option o in root.Options.Where(o => !o.Hidden && (o.Recursive || o is HelpOption))) AppendOption(m, o);
        m.Append(".PP\nWithout a command:\n");
        foreach (Option o in root.Options.OfType<VersionOption>()) AppendOption(m, o);
        m.Append(".SH EXIT STATUS\n");
        foreach (var (code, meaning) in Cli.ExitCodes) m.Append(".TP\n.B ").Append(code).Append('\n').Append(Text(meaning)).Append('\n');
        m.Append(".SH SEE ALSO\n.BR qemu\\-img (1),\n.BR qemu\\-system\\-x86_64 (1)\n");
        return m.ToString();
    }

    private static void AppendOption(StringBuilder m, Option o)
    {
        IEnumerable<string> names = o.Aliases.OrderBy(a => a.StartsWith("--", StringComparison.Ordinal)).ThenBy(a => a, StringComparer.Ordinal).Append(o.Name)
            .Where(n => n.StartsWith('-')).Distinct().OrderBy(n => n.Length);
        m.Append(".TP\n").Append(string.Join(", ", names.Select(n => $"\\fB{Roff(n)}\\fR")));
        if (TakesValue(o)) m.Append(" \\fI").Append(Roff(ValueName(o))).Append("\\fR");
        m.Append('\n');
        string description = o.Description ?? "";
        if (o.Required) description += " (required)";
        if (o.Arity.MaximumNumberOfValues > 1) description += " (may be given more than once)";
        m.Append(Text(description)).Append('\n');
    }

    /// <summary>A command's usage line: its words, its arguments, its required options, [options].</summary>
    private static string Usage(Entry e, bool withProgram)
    {
        var words = new List<string>();
        if (withProgram) words.Add("vmsnap");
        words.Add(e.Path);
        if (e.Command.Subcommands.Count > 0)
            words.Add(string.Join("|", e.Command.Subcommands.Where(c => !c.Hidden).Select(c => c.Name)) + " ...");
        foreach (Argument a in e.Command.Arguments.Where(a => !a.Hidden))
            words.Add(a.Arity.MinimumNumberOfValues == 0 ? $"[{a.Name}]" : a.Name);
        foreach (Option o in e.Command.Options.Where(o => o.Required && !o.Hidden))
            words.Add(TakesValue(o) ? $"{o.Name} {ValueName(o)}" : o.Name);
        words.Add("[options]");
        return string.Join(' ', words);
    }

    /// <summary>A paragraph of text: a line that starts with a dot or quote is made literal.</summary>
    private static string Text(string text) => "\\&" + Roff(text.ReplaceLineEndings(" "));

    /// <summary>Escapes roff's backslash, and writes hyphens as minus signs (options copied from the page then work).</summary>
    private static string Roff(string text) => text.Replace("\\", "\\e", StringComparison.Ordinal).Replace("-", "\\-", StringComparison.Ordinal);

    // ---- bash completion ------------------------------------------------------------------------

    /// <summary>A bash completion script: commands, then each command's options, the values of options with choices, files otherwise.</summary>
    internal static string BashCompletion(RootCommand root)
    {
        var b = new StringBuilder();
        b.Append("# bash completion for vmsnap; written by vmsnap --help-bash-completion from the command definitions.\n");
        b.Append("declare -A _vmsnap_commands=() _vmsnap_options=() _vmsnap_valued=() _vmsnap_choices=()\n");
        // Keyed by the command's words from "vmsnap" on (bash's associative arrays take no empty key).
        var entries = new List<(string Path, Command Command)> { ("vmsnap", root) };
        entries.AddRange(Commands(root).Select(e => ("vmsnap " + e.Path, e.Command)));
        foreach (var (path, command) in entries)
        {
            IReadOnlyList<Option> options = command is RootCommand ? [.. command.Options.Where(o => !o.Hidden)] : OptionsOf(command);
            var subcommands = command.Subcommands.Where(c => !c.Hidden).Select(c => c.Name).ToList();
            if (subcommands.Count > 0) b.Append($"_vmsnap_commands[{Quote(path)}]={Quote(string.Join(' ', subcommands))}\n");
            b.Append($"_vmsnap_options[{Quote(path)}]={Quote(string.Join(' ', options.SelectMany(Names)))}\n");
            var valued = options.Where(TakesValue).SelectMany(Names).ToList();
            if (valued.Count > 0) b.Append($"_vmsnap_valued[{Quote(path)}]={Quote(string.Join(' ', valued))}\n");
            foreach (Option o in options.Where(TakesValue))
            {
                IReadOnlyList<string> choices = ChoicesOf(o);
                if (choices.Count == 0) continue;
                foreach (string name in Names(o))
                    b.Append($"_vmsnap_choices[{Quote(path + "|" + name)}]={Quote(string.Join(' ', choices))}\n");
            }
        }
        b.Append("""
            _vmsnap()
            {
                local cur=${COMP_WORDS[COMP_CWORD]} prev=${COMP_WORDS[COMP_CWORD-1]} path=vmsnap i word
                COMPREPLY=()
                # The command's words so far (options and their values are skipped).
                for ((i = 1; i < COMP_CWORD; i++)); do
                    word=${COMP_WORDS[i]}
                    if [[ -n ${_vmsnap_commands[$path]+x} && " ${_vmsnap_commands[$path]} " == *" $word "* ]]; then
                        path="$path $word"
                    fi
                done
                # The option whose value is being typed, if any (bash splits --output=json at '=').
                local option=""
                if [[ $cur == "=" ]]; then
                    option=$prev
                    cur=""
                elif [[ $prev == "=" && $COMP_CWORD -ge 2 ]]; then
                    option=${COMP_WORDS[COMP_CWORD-2]}
                elif [[ $cur != -* && " ${_vmsnap_valued[$path]} " == *" $prev "* ]]; then
                    option=$prev
                fi
                if [[ -n $option ]]; then
                    if [[ -n ${_vmsnap_choices["$path|$option"]} ]]; then
                        COMPREPLY=($(compgen -W "${_vmsnap_choices["$path|$option"]}" -- "$cur"))
                    else
                        compopt -o filenames 2>/dev/null
                        COMPREPLY=($(compgen -f -- "$cur"))
                    fi
                    return 0
                fi
                if [[ $cur == -* ]]; then
                    COMPREPLY=($(compgen -W "${_vmsnap_options[$path]}" -- "$cur"))
                elif [[ -n ${_vmsnap_commands[$path]+x} ]]; then
                    COMPREPLY=($(compgen -W "${_vmsnap_commands[$path]}" -- "$cur"))
                else
                    compopt -o filenames 2>/dev/null
                    COMPREPLY=($(compgen -f -- "$cur"))
                fi
                return 0
            }
            complete -F _vmsnap vmsnap

            """);
        return b.ToString();
    }

    /// <summary>An option's names as typed on Linux (not the /h and -? spellings the parser also takes).</summary>
    private static IEnumerable<string> Names(Option o) => o.Aliases.Prepend(o.Name).Where(n => n.StartsWith('-') && !n.Contains('?')).Distinct();

    /// <summary>A word in bash's single quotes.</summary>
    private static string Quote(string s) => "'" + s.Replace("'", "'\\''", StringComparison.Ordinal) + "'";
}
